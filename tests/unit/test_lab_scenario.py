"""testbed.scenario's reading of the journal: the double-SIGTERM probe, on lines real Cyrus logged
in the test bed's containers (Debian 12: Cyrus 3.6.1 under systemd 252; Debian 13: 3.10.2 under 257)."""

from testbed.scenario import double_sigterm_lines

SYSTEMD = "1 (/usr/lib/systemd/systemd systemd.mask=apt-daily-upgrade.timer)"
LMTPD = "process type:SERVICE name:lmtp path:/usr/lib/cyrus/bin/lmtpd"

# Debian 12, Debian-style unit (KillMode=control-group): systemd's SIGTERM reached the children first
BOOKWORM_STOCK = f"""\
Dec 01 19:43:14.770999 vm primary-11000/lmtp[150]: graceful shutdown initiated by unexpected process {SYSTEMD}
Dec 01 19:43:14.771611 vm primary-11000/lmtp[149]: graceful shutdown initiated by unexpected process {SYSTEMD}
Dec 01 19:43:14.776086 vm primary-11000/master[141]: {LMTPD} age:8.648s pid:150 signaled to death by signal 15 (Terminated)
"""
# Debian 13, the same unit: master's SIGTERM came first, systemd's second one killed two children
TRIXIE_STOCK = f"""\
Dec 01 19:43:27.266898 vm primary-11000/master[129]: attempting clean shutdown on signal
Dec 01 19:43:27.266940 vm primary-11000/lmtp[138]: graceful shutdown
Dec 01 19:43:27.267410 vm primary-11000/lmtp[137]: graceful shutdown
Dec 01 19:43:27.267506 vm primary-11000/sync_client[134]: graceful shutdown
Dec 01 19:43:27.271004 vm primary-11000/master[129]: {LMTPD} age:7.849s pid:137 signaled to death by signal 15 (Terminated)
Dec 01 19:43:27.271999 vm primary-11000/master[129]: {LMTPD} age:7.841s pid:138 signaled to death by signal 15 (Terminated)
"""
# Debian 13, cyrushelper's unit: one SIGTERM from master; a child forked 13 ms earlier had no handler
# yet and died of that single SIGTERM without a "graceful shutdown" line
TRIXIE_OURS = f"""\
Dec 01 19:42:59.019172 vm primary-11000/imap[154]: graceful shutdown
Dec 01 19:42:59.022817 vm primary-11000/sync_client[153]: graceful shutdown
Dec 01 19:42:59.023994 vm primary-11000/master[150]: {LMTPD} age:0.013s pid:163 signaled to death by signal 15 (Terminated)
"""


def test_a_foreign_sigterm_first_is_seen_by_the_child():
    assert len(double_sigterm_lines(BOOKWORM_STOCK)) == 3   # two children complain; master saw one die


def test_master_first_then_a_second_sigterm_is_seen_by_master():
    lines = double_sigterm_lines(TRIXIE_STOCK)
    assert [line.split(" pid:")[1].split()[0] for line in lines] == ["137", "138"]


def test_one_sigterm_is_no_evidence_even_when_it_kills_a_child_without_a_handler():
    assert double_sigterm_lines(TRIXIE_OURS) == []
