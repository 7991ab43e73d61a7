"""Rescue: a stopped VM booted from the rescue system (the kernel and initramfs of the `[templates]
rescue` template) with its own disks attached, so an operator can fsck, edit files or reset a password on
its console; ended, the VM's own domain is defined again, stopped."""

from typing import Any

from tasks.context import JobContext
from tasks.control.vms import NODE_TIMEOUT_S, SAN_TIMEOUT_S
from tasks.inventory.vms import check_rescue, find_vm, placed_on
from tasks.workflow import workflow


@workflow("rescue")
def rescue_vm(ctx: JobContext) -> dict[str, Any]:
    """Boot the stopped VM into its rescue system, or with `end` put its own domain back."""
    name, end = ctx.params.vm, ctx.params.end
    # Checked once: a re-run after a crash finds the VM already in the state this job put it in.
    server = ctx.once("server", lambda: _checked_server(ctx, name, end))
    if not end:
        ctx.phase("refresh LUNs", progress=10)
        ctx.run_child("refresh-luns", {"vm": name}, timeout=SAN_TIMEOUT_S, start=10, end=30)
    ctx.phase("end rescue" if end else "boot the rescue system", progress=30)
    done = ctx.run_child("rescue-domain", {"vm": name, "server": server, "end": end}, timeout=NODE_TIMEOUT_S,
                         start=30, end=98)
    return {"vm": name, "server": server, **done}


def _checked_server(ctx: JobContext, name: str, end: bool) -> str:
    with ctx.session() as session:
        vm = find_vm(session, name)
        check_rescue(vm, end)
        return placed_on(session, vm)
