"""Task bodies on the `san.<site>` queues: volumes, iSCSI export, backups; they call workers/san."""
