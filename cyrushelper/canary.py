"""`cyrushelper canary`: deliver one small message by LMTP to an instance and say where it landed
(mailbox, UID, GUID) — the switchover's proof that writes on the new primary reach the new
replica: it delivers a canary to the new primary and waits, under a deadline, until the same UID
with the same GUID is in the new replica's index (mailboxes.py reads it).

The message goes to the instance's own LMTP listener (a UNIX socket when there is one: Cyrus
treats those connections as authenticated; else TCP, which needs `lmtpd -a` on a trusted
address), to `--rcpt` (default cyrushelper-canary): that user's INBOX must accept mail
(`autocreate_post: yes`, or create the mailbox once). One message per switchover stays there.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import smtplib
import socket
import time

from cyrushelper import arguments, exitcodes, mailboxes
from cyrushelper.config import Instance, Listen

log = logging.getLogger("cyrushelper.canary")

DEFAULT_RCPT = "cyrushelper-canary"
LMTP_TIMEOUT = 30.0


class CanaryError(Exception):
    pass


def lmtp_listener(instance: Instance) -> Listen:
    found = [listen for entry, listen in instance.listeners if entry.program == "lmtpd"]
    if not found:
        raise CanaryError(f"{instance.cyrus.path} runs no lmtpd listener: nowhere to deliver a canary")
    return sorted(found, key=lambda li: li.kind != "unix")[0]


def mailbox_of(rcpt: str) -> str:
    """Cyrus's internal INBOX name of a recipient (`user.LOCAL`, `domain!user.LOCAL`)."""
    local, _, domain = rcpt.partition("@")
    local = local.split("+", 1)[0].replace(".", "^")
    return f"{domain}!user.{local}" if domain else f"user.{local}"


def deliver(instance: Instance, rcpt: str = DEFAULT_RCPT, tag: str | None = None) -> dict:
    """Deliver one canary; return {mailbox, uid, guid, message_id, seconds}."""
    listen = lmtp_listener(instance)
    family, address = listen.connect_address()
    mailbox = mailbox_of(rcpt)
    before = mailboxes.collect(instance, [mailbox]).get(mailbox)
    last_uid = before.last_uid if before is not None and before.error is None else 0
    mid = f"<cyrushelper-canary-{tag or int(time.time() * 1000)}.{os.getpid()}@{socket.gethostname()}>"
    body = (f"From: cyrushelper <cyrushelper@{socket.gethostname()}>\r\nTo: {rcpt}\r\nSubject: cyrushelper canary {tag or ''}\r\n"
            f"Message-ID: {mid}\r\nDate: {email.utils.formatdate()}\r\n\r\n"
            "Delivered by `cyrushelper canary` to prove that replication works in this direction.\r\n")
    t0 = time.monotonic()
    try:
        if family == socket.AF_UNIX:
            conn = smtplib.LMTP(address, timeout=LMTP_TIMEOUT)
        else:
            conn = smtplib.LMTP(address[0], address[1], timeout=LMTP_TIMEOUT)
        try:
            conn.sendmail("", [rcpt], body.encode())
            conn.quit()
        finally:
            conn.close()
    except (OSError, smtplib.SMTPException) as e:
        raise CanaryError(f"LMTP delivery to {rcpt} via {listen} failed: {e}") from None
    after = mailboxes.collect(instance, [mailbox], {mailbox})[mailbox]
    if after.error:
        raise CanaryError(f"canary delivered, but {mailbox} cannot be read: {after.error}")
    new = sorted(uid for uid in after.guids if uid > last_uid)
    if not new:
        raise CanaryError(f"canary accepted by LMTP but no new message in {mailbox} (last UID {last_uid})")
    uid = new[-1]
    return {"instance": instance.name, "mailbox": mailbox, "uid": uid, "guid": after.guids[uid],
            "message_id": mid, "rcpt": rcpt, "via": str(listen), "seconds": round(time.monotonic() - t0, 3)}


def arrived(instance: Instance, canary: dict) -> bool:
    """Is the canary (same UID, same GUID) in this instance's index?"""
    facts = mailboxes.collect(instance, [canary["mailbox"]], {canary["mailbox"]})[canary["mailbox"]]
    return facts.error is None and facts.guids.get(int(canary["uid"])) == canary["guid"]


# --------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    arguments.add_instance_arguments(parser)
    parser.add_argument("--rcpt", default=DEFAULT_RCPT, metavar="ADDRESS",
                        help=f"recipient of the canary (default {DEFAULT_RCPT}); its INBOX must accept mail")
    parser.add_argument("--tag", metavar="TEXT", help="put TEXT into the canary's Message-ID and Subject")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    inst = arguments.load_instance(args)
    try:
        result = deliver(inst, args.rcpt, args.tag)
    except (CanaryError, mailboxes.MailboxError) as e:
        log.error("%s", e)
        return exitcodes.FAILURE
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"canary {result['message_id']} is UID {result['uid']} in {result['mailbox']} "
              f"(GUID {result['guid']}) via {result['via']}")
    return exitcodes.OK
