"""``spfpolicy bench`` and its world, apart from the daemon: the load
generator (``loadgen``), the workloads it sends (``workloads``), the
generated SPF zone (``zone``), the loopback DNS server that serves it and the
tests' zones (``dnsserver``), the bare parse-and-DUNNO reference server
(``bare``), and the launcher that runs Debian's policyd-spf against loopback
DNS (``pyspf_launcher``).

Only ``spfpolicy bench`` and the tests import this package; ``spfpolicy
serve`` never does, and its extra dependencies (PyYAML, matplotlib) come with
``pip install 'spfpolicy[bench]'``.
"""
