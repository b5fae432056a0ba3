"""Exit codes of every cyrushelper command (sysexits(3) numbers, familiar to mail operators).

Listed in `cyrushelper --help` and the README; a test keeps all three in step.
"""

OK = 0                    # done: for `drain`, every channel's log and log-run are gone
RECONCILE_NEEDED = 66     # EX_NOINPUT: events may be missing from the sync log, no replay recovers them (reconcile)
FAILURE = 1               # an unexpected error (a bug, or master died on its own)
USAGE = 2                 # bad command line, or a subcommand that is not implemented yet
REPLICA_UNREACHABLE = 69  # EX_UNAVAILABLE: the replica did not answer; every event kept for the next run
SYNC_FAILED = 76          # EX_PROTOCOL: the replica answered but refused/failed a batch; events kept
DEADLINE = 75             # EX_TEMPFAIL: work remained when our deadline ran out; events kept
LOCKED = 73               # another drainer holds a channel's lock (rolling sync_client, manual drain)
UNCLEAN_STOP = 70         # EX_SOFTWARE: master had to be SIGKILLed; events may be missing (reconcile)
IO_ERROR = 72             # EX_OSFILE: an output file could not be written (disk full, read-only); nothing half-written
CONFIG = 78               # EX_CONFIG: imapd.conf / cyrus.conf / arguments refused (file:line printed)
REFUSED = 77              # EX_NOPERM: refused, nothing changed (split-brain guard, switchover pre-flight)
ROLLED_BACK = 65          # EX_DATAERR: switchover aborted before the swap; the old primary serves again
UNFINISHED = 71           # EX_OSERR: switchover stopped between steps; switchover.json says where (--resume/--abort)
UNVERIFIED = 74           # EX_IOERR: roles swapped, but the canary did not reach the new replica in time

DESCRIPTIONS = {
    OK: "success (for drain: every sync log of every channel replicated and removed)",
    FAILURE: "unexpected failure (e.g. master died on its own); see the journal",
    USAGE: "usage error, or subcommand not implemented yet",
    RECONCILE_NEEDED: "events may be missing that no log replay recovers (Cyrus failed to write its sync "
                      "log, a damaged line, an unclean stop): reconcile with sync_client -A, or "
                      "`drain --reconcile auto`",
    REPLICA_UNREACHABLE: "replica unreachable: events kept untouched, the next start or drain replays them",
    LOCKED: "another drainer (rolling sync_client, manual drain) holds a channel lock",
    DEADLINE: "deadline reached with work left: events kept, rerun drain",
    SYNC_FAILED: "replica answered but a batch failed: events kept, see the journal",
    UNCLEAN_STOP: "master needed SIGKILL: stop recorded as unclean, reconcile with sync_client -A",
    IO_ERROR: "could not write the output (disk full, read-only, permissions): nothing half-written, "
              "the previous output intact",
    CONFIG: "configuration error (message names file:line); nothing written",
    REFUSED: "refused, nothing changed: a switchover pre-flight check failed, or the split-brain guard "
             "(the recorded role differs from the one asked for)",
    ROLLED_BACK: "switchover aborted before the roles were swapped and rolled back: the old primary serves "
                 "again (reason on stderr and in the report)",
    UNFINISHED: "switchover stopped between steps (e.g. a rollback failed): its state is kept, run "
                "`switchover --resume` or `--abort`",
    UNVERIFIED: "roles swapped, but the canary message did not reach the new replica within the bound",
}


def epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in sorted(DESCRIPTIONS.items()))
