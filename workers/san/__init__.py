"""The SAN worker's host side: volume backends (reflink files, LVM thin), tgt iSCSI export, safe shrink.

`backend.VolumeBackend` is the interface (handles are plain strings: `<volume>` or
`<volume>@<snapshot>`); `reflink.ReflinkBackend` and `lvm.LvmThinBackend` implement it;
`tgt.Tgt` exports volumes; `shrink.safe_shrink` shrinks a stopped volume without losing data.
"""
