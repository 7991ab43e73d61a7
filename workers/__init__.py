"""Host agents: how things are done on a machine. Plain arguments in, plain results out; no Celery, no DB."""
