"""A whole two-site LaxCluster on one Linux machine: namespaces as hosts, real libvirtd and tgtd.

`lab.cluster.up/down/status` drive it; `lab.topology` says what it is made of (from the config);
`lab.testing` gives tests a lab of their own.
"""
