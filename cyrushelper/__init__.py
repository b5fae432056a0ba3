"""cyrushelper: lossless stops and soft failover for Cyrus IMAP replication under systemd."""

__version__ = "0.1.0"
