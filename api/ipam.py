"""The HTTP face of the network DB: subnets, their leases, and DHCP host files made from them."""

from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from sqlalchemy import select

from api import context, validation
from api.changes import audit
from api.openapi import operation
from errors import SubnetNotFound
from models import Lease, Subnet, VirtualMachine
from tasks.inventory import ipam

subnets = Blueprint("subnets", __name__)
leases = Blueprint("leases", __name__)

HOSTS_FORMATS = ("dnsmasq", "isc")
SUBNET_FIELDS = {"name", "cidr", "gateway", "dns", "range_start", "range_end", "mac_prefix"}
MAX_DNS_SERVERS = 8
_TEXT = {"type": "string"}


def subnet_json(subnet: Subnet) -> dict[str, Any]:
    return {"name": subnet.name, "cidr": subnet.cidr, "gateway": subnet.gateway, "dns": subnet.dns,
            "range_start": subnet.range_start, "range_end": subnet.range_end, "mac_prefix": subnet.mac_prefix}


def lease_json(lease: Lease, subnet: str, vm: str | None) -> dict[str, Any]:
    return {"subnet": subnet, "vm": vm, "mac": lease.mac, "ip": lease.ip, "hostname": lease.hostname}


SUBNET_SCHEMA = {"type": "object", "properties": {
    "name": _TEXT, "cidr": _TEXT, "gateway": {"type": ["string", "null"]}, "dns": {"type": "array", "items": _TEXT},
    "range_start": _TEXT, "range_end": _TEXT, "mac_prefix": _TEXT}}
LEASE_SCHEMA = {"type": "object", "properties": {
    "subnet": _TEXT, "vm": {"type": ["string", "null"]}, "mac": _TEXT, "ip": _TEXT, "hostname": _TEXT}}


def items_of(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a list answer: {"items": [schema, ...]}."""
    return {"type": "object", "properties": {"items": {"type": "array", "items": schema}}}


@subnets.get("/subnets")
@operation("List subnets: CIDR, gateway, DNS, the range leases come from, the MAC prefix", response=items_of(SUBNET_SCHEMA))
def index():
    with context.session() as db:
        return jsonify(items=[subnet_json(subnet) for subnet in db.scalars(select(Subnet).order_by(Subnet.name))])


@subnets.get("/subnets/<name>")
@operation("Show one subnet", response=SUBNET_SCHEMA)
def show(name: str):
    validation.name(name, "name")
    with context.session() as db:
        return jsonify(subnet_json(_subnet(db, name)))


@subnets.post("/subnets")
@operation("Add a subnet to lease addresses from (a DB change, no job)", role="admin", status=201,
           response=SUBNET_SCHEMA, body={**SUBNET_SCHEMA, "required": ["name", "cidr", "range_start", "range_end"]})
def create():
    fields = _subnet_fields(validation.json_body())
    with context.session() as db:
        subnet = ipam.create_subnet(db, **fields)
        audit(db, "subnet.create", f"subnet/{subnet.name}", **fields)
        body = subnet_json(subnet)
    response = jsonify(body)
    response.status_code = 201
    response.headers["Location"] = url_for("subnets.show", name=body["name"])
    return response


@subnets.get("/subnets/<name>/hosts")
@operation("The subnet's leases as a DHCP host file: dnsmasq dhcp-hostsfile or ISC dhcpd host declarations",
           query={"format": {"enum": list(HOSTS_FORMATS), "default": "dnsmasq"}},
           media_type="text/plain", response={"type": "string"})
def hosts(name: str):
    validation.name(name, "name")
    fmt = validation.choice(request.args.get("format", "dnsmasq"), "format", HOSTS_FORMATS)
    with context.session() as db:
        text = ipam.hosts_file(db, _subnet(db, name), fmt)
    return Response(text, mimetype="text/plain")


@leases.get("/leases")
@operation("List address leases (MAC, IP, hostname, VM), optionally of one subnet or one VM", response=items_of(LEASE_SCHEMA),
           query={"subnet": {"type": "string"}, "vm": {"type": "string"}})
def lease_index():
    query = (select(Lease, Subnet.name, VirtualMachine.name).join(Subnet, Lease.subnet_id == Subnet.id)
             .outerjoin(VirtualMachine, Lease.vm_id == VirtualMachine.id).order_by(Subnet.name, Lease.id))
    if "subnet" in request.args:
        query = query.where(Subnet.name == validation.name(request.args["subnet"], "subnet"))
    if "vm" in request.args:
        query = query.where(VirtualMachine.name == validation.name(request.args["vm"], "vm"))
    with context.session() as db:
        return jsonify(items=[lease_json(lease, subnet, vm) for lease, subnet, vm in db.execute(query)])


def _subnet(db, name: str) -> Subnet:
    subnet = db.scalar(select(Subnet).where(Subnet.name == name))
    if subnet is None:
        raise SubnetNotFound(f"no subnet {name}", name=name)
    return subnet


def _subnet_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ipam.create_subnet from a request body, each field type-checked."""
    validation.reject_unknown(body, SUBNET_FIELDS)
    fields = {"name": validation.name(body.get("name"), "name")}
    for field in ("cidr", "range_start", "range_end"):
        fields[field] = _text(body.get(field), field)
    fields["gateway"] = None if body.get("gateway") is None else _text(body["gateway"], "gateway")
    dns = body.get("dns", [])
    if not isinstance(dns, list) or len(dns) > MAX_DNS_SERVERS:
        raise validation.invalid("dns", f"must be a list of at most {MAX_DNS_SERVERS} addresses")
    fields["dns"] = [_text(server, "dns") for server in dns]
    fields["mac_prefix"] = _text(body.get("mac_prefix", "52:54:00"), "mac_prefix")
    return fields


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise validation.invalid(field, "must be a string of 1-64 characters")
    return value
