"""Read-only lists of where things run: sites and clusters (the config file defines them; SANs are in api.storage)."""

from collections.abc import Callable
from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import select

from api import context
from api.openapi import list_of, operation
from api.representations import cluster_json, site_json
from models import Cluster, Site


def listing(resource: str, model: type, to_json: Callable[[Any], dict[str, Any]], schema: str) -> Blueprint:
    """A blueprint with one route, `GET /<resource>`, listing every `model` row by name."""
    blueprint = Blueprint(resource, __name__)

    @blueprint.get(f"/{resource}")
    @operation(f"List {resource}", response=list_of(schema))
    def index():
        with context.session() as db:
            return jsonify(items=[to_json(row) for row in db.scalars(select(model).order_by(model.name))])

    return blueprint


sites = listing("sites", Site, site_json, "Site")
clusters = listing("clusters", Cluster, cluster_json, "Cluster")
