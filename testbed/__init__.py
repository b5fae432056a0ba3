"""Test bed: real Cyrus instances, mail load and a throwaway systemd, for tests and the README demo."""
