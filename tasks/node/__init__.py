"""Task bodies on the `node.<server>` queues: domains, migration, facts; they call workers/node."""
