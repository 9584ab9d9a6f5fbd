#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (fuzz/seeds/<target>/) from the example frames and
records of docs/PROTOCOL.md section 7, and a few ISO 8583 messages and MPM payloads: valid
inputs the fuzzer starts from, so that it mutates well-formed bodies. Run from anywhere;
the opcode and status tables follow fuzz/src/lib.rs."""
import pathlib
import re

root = pathlib.Path(__file__).resolve().parents[2]
seeds = root / "fuzz" / "seeds"
lib = (root / "fuzz" / "src" / "lib.rs").read_text()
names = {m[0]: int(m[1], 16) for m in re.findall(r"pub const (\w+): u16 = (0x[0-9a-fA-F]+);",
                                                   (root / "protocol/src/messages.rs").read_text())}

def table(name):
    block = re.search(rf"pub const {name}: &\[u16\] = &\[(.*?)\];", lib, re.S)[1]
    return [w.strip() for w in block.split(",") if w.strip()]

request_ops = [names[n] for n in table("REQUEST_OPCODES")]
response_ops = [names[n] for n in table("RESPONSE_OPCODES")]
statuses = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16]

def write(target, name, data):
    d = seeds / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)

doc = (root / "docs" / "PROTOCOL.md").read_text()
for name, block in re.findall(r"#### ([\w-]+)\n.*?```hex\n(.*?)```", doc, re.S):
    data = bytes.fromhex(block)
    if name == "code-text":  # its text starts with "SG" too
        write("code_text", name, b"\x00" + data)
    elif data[:2] == b"SG":
        write("frame_fixed", name, data)
        write("frame_decode", name, data)
        flags, opcode, status = data[3], int.from_bytes(data[4:6], "big"), int.from_bytes(data[6:8], "big")
        body = data[28:]
        if flags & 1 == 0:
            write("request_body", name, bytes([request_ops.index(opcode)]) + body)
        else:
            op = bytes([response_ops.index(opcode)]) if opcode in response_ops else b"\xff" + data[4:6]
            write("response_body", name, op + bytes([statuses.index(status)]) + body)
    elif name == "inherent-id":
        write("inherent_decode", name, data)
    elif name == "age-record":
        write("age_record", name, data)

# A payment code's body for the tagging mode: kind C1, issuer 1, number, 5,000 JPY, expiry, flags.
write("code_text", "payment-body", b"\x01" + bytes.fromhex(
    "c1 0001 010000000000002a 0000000000001388 4a5059 6b02e8d8 00"))
write("code_text", "coupon-body", b"\x01" + bytes.fromhex(
    "c5 0001 0000000000000007 00000000000001f4 585858 6b02e8d8 01"))

promptpay = b"00020101021229370016A0000006770101110113006680111111153037645802TH540520.15630442BE"
write("emv_mpm", "promptpay", b"\x00" + promptpay)
write("emv_mpm", "two-networks-unsigned", b"\x01" + b"000201010211"
      b"26190015jp.example.pay1" b"27220018com.example.wallet"
      b"52045411530339258" b"02JP5910Demo Store6005Tokyo")

def iso(mti, fields):
    """An ISO 8583 body: fields is {number: encoded value, length prefix included}."""
    bitmap = bytearray(16)
    if any(n > 64 for n in fields):
        bitmap[0] |= 0x80
    for n in fields:
        bitmap[(n - 1) // 8] |= 0x80 >> ((n - 1) % 8)
    size = 16 if bitmap[0] & 0x80 else 8
    return mti + bytes(bitmap[:size]) + b"".join(fields[n] for n in sorted(fields))

request = iso(b"0100", {2: b"164111111111111111", 3: b"000000", 4: b"000000198000",
                        7: b"1206010203", 11: b"000042", 37: b"123456789012",
                        41: b"POS00001", 49: b"392"})
approval = iso(b"0110", {11: b"000042", 37: b"123456789012", 38: b"AB12CD", 39: b"00"})
echo = iso(b"0800", {7: b"1206010203", 11: b"000043", 70: b"301"})
for name, body in [("authorization", request), ("approval", approval), ("echo", echo)]:
    write("iso8583_message", name, body)
    write("iso8583_frame", name, len(body).to_bytes(2, "big") + body)
write("iso8583_frame", "two-frames", b"".join(len(b).to_bytes(2, "big") + b for b in (approval, echo)))
