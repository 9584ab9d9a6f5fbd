"""An ISO 8583 issuer-host simulator: the test peer of settlegate's ISO 8583 adapter.

Written against the `pyiso8583` library (its `iso8583.specs.default` spec: ASCII fields,
binary bitmap), not against settlegate's Rust codec, so the adapter's tests exercise an
independent implementation of the format. Used by `adapters/tests/iso8583.rs`.

Usage:
    python3 iso_host.py [--host 127.0.0.1] [--port 0] [--ledger PATH] [--tally-file PATH]
                        [--approve-limit N] [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]

With `--tls-cert` and `--tls-key` it speaks TLS (Python's `ssl` module); with
`--tls-client-ca` it also requires a client certificate issued by that CA.

Once listening it prints one line, `PORT <n>`, on stdout (`--port 0` picks a free port).

Framing: every message is preceded by a 2-byte big-endian length header.

Behaviour, by message type:

- 0800 network management: answered 0810 with response code (39) `00`, fields 7, 11 and 70
  echoed (70: `001` sign-on, `301` echo test).
- 0100 / 0200 authorization / financial request: answered 0110 / 0210 with fields 3, 4, 7,
  11, 37, 41, 42 and 49 echoed (never field 2), and 39 (and 38 when approved) chosen by the
  amount in field 4, in minor units (the triggers):

  ============== ====================================================================
  amount         behaviour
  ============== ====================================================================
  500..=599      decline `05` (do not honor)
  1400..=1499    decline `14` (invalid card number)
  6100..=6199    decline `61` (exceeds amount limit)
  9600..=9699    `96` (system malfunction)
  3000..=3099    response code (amount - 3000) as two digits (3085: `85`), with field 38
                 as for an approval: for the adapter's `response_codes` overrides
  7000..=7999    approve after a delay of (amount - 7000) * 10 ms: a late reply when the
                 delay exceeds the adapter's response timeout
  8000..=8099    drop: never answered
  9000..=9099    three malformed but well-framed frames first (an undecodable field 2
                 length, a reply for this STAN without field 39, a body with a bad MTI),
                 then the real approval 50 ms later
  > limit        decline `51` (insufficient funds) above `--approve-limit`
                 (default 1,000,000)
  otherwise      approve, authorization code (38) = the amount modulo 10^6 in six digits
  ============== ====================================================================

  An approval (`00`), and an authorization it drops (8000..=8099: the reply is "lost", the
  hold stands), is entered in the host's own account of authorizations (the tally, below).
  A 0100 is a hold (state authorized, until a capture); a 0200 is a sale, settled with its
  approval (state captured, captured = the amount), which refunds may follow, and which a
  reversal undoes whole until the first refund.

- Lifecycle messages, each matched to its authorization by field 37 (the authorization's RRN)
  and field 90 (its STAN must be the original's: otherwise the authorization is unknown):

  ================================ ===========================================================
  message                          operation
  ================================ ===========================================================
  0220 / 0221 (answered 0230)      capture of the amount in field 4
  0200 + field 90, field 3 `00…`   capture (the adapter's `capture_mti = "0200"`), 0210
  0200 + field 90, field 3 `20…`   refund of the amount in field 4, 0210
  0400 / 0401 (0410), 0420 / 0421  void when field 39 is `17` (customer cancellation),
  (0430)                           otherwise reversal
  ================================ ===========================================================

  The host refuses what a real one would, with these response codes (field 39):

  ==== ======================================================================================
  code when
  ==== ======================================================================================
  00   done; also a void or reversal of one already voided or reversed (nothing to undo),
       and a reversal of an authorization the host does not hold
  12   invalid transaction: a capture of one captured, voided or reversed; a void or reversal
       after the capture (a reversal of a sale: after a refund of it); a refund before it
  13   invalid amount: zero, a capture above the amount authorized, a refund that would take
       the refunds past the amount captured
  25   unable to locate the original: a capture, void or refund of an authorization the host
       does not hold (or whose field 90 STAN does not match)
  ==== ======================================================================================

  One capture per authorization; any number of refunds after it.
- 0400 / 0401 reversal: answered 0410; the original (field 90's STAN) is noted reversed.
- 0420 / 0421 reversal advice: answered 0430, likewise.
- A frame whose body starts with `ECHO` is written back unchanged, without decoding: a raw
  round trip for benchmark baselines.

Ledger (`--ledger PATH`): one JSON object per message received or sent, flushed after each
batch of input, so a test can check what the host saw:
`{"dir": "in"|"out"|"op"|"drop"|"malformed", "mti", "stan", "rrn", "amount", "code",
"nmi", "orig_stan", "pan_last4", "delay_ms", "reversed", "op", "f3", "f12", "f13", "f18",
"f22", "f25", "f32", "f38", "f41", "f42", "f43", "f48", "f90", "tls", "client_cn"}` (absent fields omitted; `fN` is field N as
received; `tls` and `client_cn` only on a TLS connection). Only the last four digits of a PAN
are written. Each lifecycle message also gets a line `"dir": "op"`, with `"op"` (capture,
void, refund, reversal) and `"code"` the host's answer (its "in" line has field 39 as sent:
`17` for a void).

Tally (`--tally-file PATH`): the host's own account of every authorization it holds,
rewritten whole (to a temporary file, then renamed) on each change, for reconciliation:
`{"authorizations": [{"rrn", "stan", "mti", "transmitted", "auth_code", "authorized",
"captured", "refunded", "voided", "reversed", "state"}, ...], "totals": {"count",
"authorized", "captured", "refunded", "voided", "reversed"}}`, amounts in minor units,
authorizations in RRN order, `state` one of authorized, captured, voided, reversed.
"""

import argparse
import asyncio
import json
import os
import ssl
import sys

import iso8583
from iso8583.specs import default as SPEC

ECHOED_FIELDS = ("3", "4", "7", "11", "37", "41", "42", "49")
# Reversal requests and advices (and their repeats), with the MTI that acknowledges them.
REVERSAL_ACKS = {"0400": "0410", "0401": "0410", "0420": "0430", "0421": "0430"}
# Capture advices (and repeats), with their answer.
ADVICE_ACKS = {"0220": "0230", "0221": "0230"}
# Field 39 of a reversal message that makes it a void: customer cancellation.
VOID_REASON = "17"
# Fields written to the ledger as received, under "f<n>".
LEDGER_FIELDS = ("3", "12", "13", "18", "22", "25", "32", "38", "41", "42", "43", "48", "90")


def frame(body):
    return len(body).to_bytes(2, "big") + bytes(body)


def encode(doc):
    body, _ = iso8583.encode(doc, SPEC)
    return frame(body)


def malformed_frames(request):
    """Well-framed messages the adapter must reject without losing the connection."""
    bitmap_pan_only = bytes([0x40, 0, 0, 0, 0, 0, 0, 0])
    undecodable = b"0110" + bitmap_pan_only + b"99" + b"4" * 99
    no_response_code = {"t": "0110", "11": request["11"], "37": request.get("37", "0" * 12)}
    bad_mti = b"01X0" + bytes(8) + b"garbage!"
    return [frame(undecodable), encode(no_response_code), frame(bad_mti)]


def decide(amount, limit):
    """Response code and reply delay for an authorization of `amount`, or None to drop it."""
    if 500 <= amount <= 599:
        return "05", 0.0
    if 1400 <= amount <= 1499:
        return "14", 0.0
    if 6100 <= amount <= 6199:
        return "61", 0.0
    if 9600 <= amount <= 9699:
        return "96", 0.0
    if 3000 <= amount <= 3099:
        return f"{amount - 3000:02d}", 0.0
    if 7000 <= amount <= 7999:
        return "00", (amount - 7000) * 0.010
    if 8000 <= amount <= 8099:
        return None
    if amount > limit:
        return "51", 0.0
    return "00", 0.0


class Host(asyncio.Protocol):
    def __init__(self, state):
        self.state = state
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.peer = {}
        if transport.get_extra_info("ssl_object") is not None:
            self.peer["tls"] = True
            cert = transport.get_extra_info("peercert") or {}
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        self.peer["client_cn"] = value

    def data_received(self, data):
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            length = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + length:
                break
            body = bytes(self.buf[2 : 2 + length])
            del self.buf[: 2 + length]
            if body.startswith(b"ECHO"):
                out.append(frame(body))
                continue
            try:
                doc, _ = iso8583.decode(body, SPEC)
            except iso8583.DecodeError as error:
                print(f"iso_host: undecodable request: {error}", file=sys.stderr)
                continue
            self.handle(doc, out)
        # The ledger first: once a reply is out, a test may read the ledger.
        self.state.flush()
        if out:
            self.transport.write(b"".join(out))

    def send_later(self, delay, frames, reply, **extra):
        def send():
            if not self.transport.is_closing():
                self.state.record("out", reply, **self.peer, **extra)
                self.state.flush()
                self.transport.write(b"".join(frames))

        asyncio.get_running_loop().call_later(delay, send)

    def handle(self, doc, out):
        state = self.state
        mti = doc["t"]
        state.record("in", doc, **self.peer)
        if mti == "0800":
            reply = {"t": "0810", "39": "00"}
            reply.update({k: doc[k] for k in ("7", "11", "70") if k in doc})
            out.append(encode(reply))
            state.record("out", reply)
        elif mti == "0200" and "90" in doc:
            refund = doc.get("3", "").startswith("20")
            self.lifecycle(doc, out, "0210", "refund" if refund else "capture")
        elif mti in ("0100", "0200"):
            self.authorize(doc, out)
        elif mti in ADVICE_ACKS:
            self.lifecycle(doc, out, ADVICE_ACKS[mti], "capture")
        elif mti in REVERSAL_ACKS:
            original = doc.get("90", "")[4:10]
            state.reversed.add(original)
            void = doc.get("39") == VOID_REASON
            self.lifecycle(doc, out, REVERSAL_ACKS[mti], "void" if void else "reversal")

    def lifecycle(self, doc, out, reply_mti, op):
        state = self.state
        code = state.apply(op, doc)
        state.record("op", doc, op=op, code=code, **self.peer)
        reply = {"t": reply_mti, "39": code}
        reply.update({k: doc[k] for k in ECHOED_FIELDS if k in doc})
        out.append(encode(reply))
        state.record("out", reply, **self.peer)

    def authorize(self, doc, out):
        state = self.state
        amount = int(doc.get("4", "0"))
        decision = decide(amount, state.limit)
        if decision is None:
            state.record("drop", doc, **self.peer)
            state.hold(doc, f"{amount % 1_000_000:06d}")
            return
        code, delay = decision
        if code == "00":
            state.hold(doc, f"{amount % 1_000_000:06d}")
        reply = {"t": "0110" if doc["t"] == "0100" else "0210", "39": code}
        reply.update({k: doc[k] for k in ECHOED_FIELDS if k in doc})
        if code == "00" or 3000 <= amount <= 3099:
            reply["38"] = f"{amount % 1_000_000:06d}"
        frames = [encode(reply)]
        if 9000 <= amount <= 9099:
            out.extend(malformed_frames(doc))
            state.record("malformed", doc, **self.peer)
            self.send_later(0.05, frames, reply)
        elif delay > 0:
            self.send_later(delay, frames, reply, delay_ms=int(delay * 1000))
        else:
            out.extend(frames)
            state.record("out", reply, **self.peer)


class State:
    def __init__(self, ledger_path, limit, tally_path=None):
        self.ledger = open(ledger_path, "a", encoding="utf-8") if ledger_path else None
        self.limit = limit
        self.reversed = set()
        self.tally_path = tally_path
        # The host's authorizations by RRN (field 37).
        self.holds = {}
        # The RRNs of sales (0200 originals): settled with their approval.
        self.sales = set()
        self.write_tally()

    def hold(self, doc, auth_code):
        """Enters an approved authorization in the tally."""
        rrn = doc.get("37", "")
        self.holds[rrn] = {
            "rrn": rrn,
            "stan": doc.get("11"),
            "mti": doc.get("t"),
            "transmitted": doc.get("7"),
            "auth_code": auth_code,
            "authorized": int(doc.get("4", "0")),
            "captured": 0,
            "refunded": 0,
            "voided": 0,
            "reversed": 0,
            "state": "authorized",
        }
        if doc.get("t") == "0200":
            self.sales.add(rrn)
            self.holds[rrn]["captured"] = self.holds[rrn]["authorized"]
            self.holds[rrn]["state"] = "captured"
        self.write_tally()

    def apply(self, op, doc):
        """Applies a lifecycle operation to the authorization it names; its response code."""
        amount = int(doc.get("4", "0"))
        hold = self.holds.get(doc.get("37", ""))
        if hold is not None and doc.get("90", "")[4:10] != hold["stan"]:
            hold = None
        if hold is None:
            return "00" if op == "reversal" else "25"
        code = self.rule(op, hold, amount, hold["rrn"] in self.sales)
        if code == "00":
            self.write_tally()
        return code

    @staticmethod
    def rule(op, hold, amount, sale=False):
        state = hold["state"]
        if op == "reversal" and sale and state == "captured" and hold["refunded"] == 0:
            # A sale whose answer the acquirer could not record: undone whole.
            hold["captured"] = 0
            hold["reversed"] = hold["authorized"]
            hold["state"] = "reversed"
            return "00"
        if op == "capture":
            if state != "authorized":
                return "12"
            if amount <= 0 or amount > hold["authorized"]:
                return "13"
            hold["captured"] = amount
            hold["state"] = "captured"
        elif op in ("void", "reversal"):
            if state == "captured":
                return "12"
            if state == "authorized":
                hold["voided" if op == "void" else "reversed"] = hold["authorized"]
                hold["state"] = "voided" if op == "void" else "reversed"
        elif op == "refund":
            if state != "captured":
                return "12"
            if amount <= 0 or hold["refunded"] + amount > hold["captured"]:
                return "13"
            hold["refunded"] += amount
        return "00"

    def write_tally(self):
        if self.tally_path is None:
            return
        holds = [self.holds[rrn] for rrn in sorted(self.holds)]
        totals = {"count": len(holds)}
        for key in ("authorized", "captured", "refunded", "voided", "reversed"):
            totals[key] = sum(h[key] for h in holds)
        temporary = self.tally_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as tally:
            json.dump({"authorizations": holds, "totals": totals}, tally)
        os.replace(temporary, self.tally_path)

    def record(self, direction, doc, **extra):
        if self.ledger is None:
            return
        entry = {"dir": direction, "mti": doc.get("t")}
        for key, name in (("11", "stan"), ("37", "rrn"), ("39", "code"), ("70", "nmi")):
            if key in doc:
                entry[name] = doc[key]
        if "4" in doc:
            entry["amount"] = int(doc["4"])
        if "90" in doc:
            entry["orig_stan"] = doc["90"][4:10]
        if "2" in doc:
            entry["pan_last4"] = doc["2"][-4:]
        for key in LEDGER_FIELDS:
            if key in doc:
                entry["f" + key] = doc[key]
        if doc.get("11") in self.reversed and doc.get("t") in ("0110", "0210"):
            entry["reversed"] = True
        entry.update(extra)
        self.ledger.write(json.dumps(entry) + "\n")

    def flush(self):
        if self.ledger is not None:
            self.ledger.flush()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ledger")
    parser.add_argument("--tally-file", help="JSON account of authorizations, on each change")
    parser.add_argument("--approve-limit", type=int, default=1_000_000)
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA: require a client certificate")
    args = parser.parse_args()
    state = State(args.ledger, args.approve_limit, args.tally_file)
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.tls_client_ca)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Host(state), args.host, args.port, reuse_address=True, ssl=context
    )
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
