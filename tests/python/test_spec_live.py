"""Live checks of docs/PROTOCOL.md against a running ``settlegate serve``.

The server address is ``127.0.0.1:7878`` unless ``SETTLEGATE_ADDR`` says
``host:port``. When the server is unreachable the module is skipped, unless
``SETTLEGATE_LIVE=1`` demands a server (run.sh sets it), in which case the
tests fail.

Facts taken from the brief rather than from PROTOCOL.md (the document does
not describe the demo data): terminal ``DEMO-SHIBUYA-01`` is listed for
provider 2 with a fixed 50 JPY discount, and demo provider 1 declines
amounts above 500,000 with reason 20.
"""

import functools
import os
import socket
import time
import unittest
import uuid

import sgclient as sg

ADDR = sg.parse_addr(os.environ.get("SETTLEGATE_ADDR"))
REQUIRE_SERVER = os.environ.get("SETTLEGATE_LIVE") == "1"
API_KEY = "sg-demo-key"
DEMO_TERMINAL = "DEMO-SHIBUYA-01"
UNKNOWN_TERMINAL = "NO-SUCH-TERM-99"
CARD_PROVIDER_DISCOUNT = 50
PAN = "4111111111111111"
PASSWORD = "correct-horse-battery"
WRONG_PASSWORD = "wrong-password-123"
UNKNOWN_OPCODE = 0x7ABC


def setUpModule():
    """Skip the module when no server listens (unless one is required)."""
    try:
        socket.create_connection(ADDR, timeout=2).close()
    except OSError as exc:
        if REQUIRE_SERVER:
            raise
        raise unittest.SkipTest(f"no settlegate server at {ADDR[0]}:{ADDR[1]}: {exc}")


def connect(authenticated=True):
    """A new connection, authenticated with the demo API key by default."""
    client = sg.SettlegateClient.connect(ADDR, timeout=10.0)
    if authenticated:
        client.auth(API_KEY)
    return client


def fresh_user():
    """A mail-address user that does not exist yet."""
    return sg.User.mail(f"py-{uuid.uuid4().hex}@example.com")


def fresh_card_idm():
    """A random 8-byte card IDm."""
    return os.urandom(8)


class Account:
    """A freshly enrolled user with one device, a credit card and e-money."""

    def __init__(self, client):
        self.user = fresh_user()
        self.card_idm = fresh_card_idm()
        self.credential = client.enroll(sg.new_client_request_id(), self.user,
                                        PASSWORD, self.card_idm)
        self.device = sg.Device(self.user, self.credential)
        # make_default=1 on the card: PROTOCOL.md does not say whether the
        # first means becomes the default by itself.
        self.card = client.add_means(sg.new_client_request_id(), self.user,
                                     sg.CreditCard(PAN), make_default=True)
        self.emoney = client.add_means(sg.new_client_request_id(), self.user,
                                       sg.EMoney("suica"), make_default=False)


@functools.lru_cache(maxsize=None)
def shared_account():
    """One :class:`Account` shared by the tests of this module."""
    with connect() as client:
        return Account(client)


class LiveTestCase(unittest.TestCase):
    """Opens an authenticated connection per test."""

    def setUp(self):
        self.client = connect()
        self.addCleanup(self.client.close)


class PreAuthenticationTest(unittest.TestCase):
    """Section 3: what an unauthenticated connection may do."""

    def setUp(self):
        self.client = connect(authenticated=False)
        self.addCleanup(self.client.close)

    def test_ping_before_auth(self):
        self.assertEqual(self.client.ping(b"hello"), b"hello")
        self.assertEqual(self.client.ping(), b"")

    def test_ping_response_echoes_opcode_and_request_id(self):
        request_id = self.client.send(sg.Op.PING, b"x")
        frame = self.client.wait_for(request_id)
        self.assertEqual((frame.opcode, frame.status, frame.request_id),
                         (sg.Op.PING, sg.Status.OK, request_id))
        self.assertTrue(frame.is_response)
        self.assertFalse(frame.is_push)

    def test_server_info(self):
        info = self.client.server_info()
        self.assertEqual(info.protocol_version, 1)
        self.assertEqual(info.body_length_max, sg.BODY_LENGTH_MAX)
        self.assertEqual(info.in_flight_max, sg.IN_FLIGHT_MAX)
        self.assertGreaterEqual(info.shards, 1)
        self.assertTrue(info.server_version)
        codes = {provider.code for provider in info.providers}
        self.assertTrue({1, 2} <= codes, f"providers listed: {sorted(codes)}")

    def test_operation_before_auth_is_unauthenticated(self):
        frame = self.client.request(
            sg.Op.CONFIRM_TERMINAL, sg.encode_confirm_terminal(2, DEMO_TERMINAL))
        self.assertEqual(frame.status, sg.Status.UNAUTHENTICATED)
        reply = sg.decode_status_body(frame.status, frame.body)
        self.assertIsInstance(reply.detail, str)

    def test_auth(self):
        reply = self.client.auth(API_KEY)
        self.assertTrue(reply.identity_name)
        all_permissions = sg.Permission.AUTHORIZE | sg.Permission.ACCOUNTS | sg.Permission.PROVIDERS
        self.assertEqual(reply.permissions & all_permissions, all_permissions)
        confirmed = self.client.confirm_terminal(2, DEMO_TERMINAL)
        self.assertTrue(confirmed.listed)

    def test_failed_auth_closes_connection(self):
        frame = self.client.request(sg.Op.AUTH, sg.encode_auth("not-the-demo-key"))
        self.assertEqual(frame.status, sg.Status.UNAUTHENTICATED)
        self.assertTrue(self.client.wait_closed(5.0), "connection left open after failed AUTH")


class AccountOperationsTest(LiveTestCase):
    """ENROLL, LOGIN, ADD_MEANS, LIST_MEANS."""

    @classmethod
    def setUpClass(cls):
        cls.account = shared_account()

    def test_enroll_fresh_user(self):
        card_idm = fresh_card_idm()
        credential = self.client.enroll(sg.new_client_request_id(), fresh_user(),
                                        PASSWORD, card_idm)
        self.assertEqual(credential.card_idm, card_idm)
        self.assertEqual(len(credential.device_key), sg.DEVICE_KEY_LEN)
        self.assertNotEqual(credential.device_key, bytes(sg.DEVICE_KEY_LEN))

    def test_enroll_existing_user_refused(self):
        with self.assertRaises(sg.StatusError) as caught:
            self.client.enroll(sg.new_client_request_id(), self.account.user,
                               PASSWORD, fresh_card_idm())
        self.assertEqual(caught.exception.status, sg.Status.REFUSED)
        self.assertEqual(caught.exception.reason, sg.Reason.USER_EXISTS)

    def test_login_right_password(self):
        self.client.login(self.account.user, PASSWORD)

    def test_login_wrong_password(self):
        with self.assertRaises(sg.StatusError) as caught:
            self.client.login(self.account.user, WRONG_PASSWORD)
        self.assertEqual(caught.exception.status, sg.Status.REFUSED)
        self.assertEqual(caught.exception.reason, sg.Reason.WRONG_PASSWORD)

    def test_add_credit_card(self):
        self.assertEqual(self.account.card.last4, "1111")

    def test_add_emoney(self):
        self.assertNotEqual(self.account.emoney.means_id, self.account.card.means_id)
        self.assertEqual(self.account.emoney.last4, "")

    def test_list_means(self):
        frame = self.client.request(sg.Op.LIST_MEANS,
                                    sg.encode_list_means(self.account.user))
        raw = frame.encode()
        # assertFalse, not assertNotIn: a failure must not print the card number
        self.assertFalse(PAN.encode("ascii") in raw, "card number present in LIST_MEANS")
        self.assertFalse(bytes.fromhex(PAN) in raw, "card number (BCD) present in LIST_MEANS")
        entries = sg.decode_list_means(sg.ok_body(frame))
        by_id = {entry.means_id: entry for entry in entries}
        self.assertEqual(len(entries), 2)
        card = by_id[self.account.card.means_id]
        emoney = by_id[self.account.emoney.means_id]
        self.assertEqual((card.kind, card.last4, card.is_default),
                         (sg.MeansKind.CREDIT_CARD, "1111", True))
        self.assertEqual((emoney.kind, emoney.is_default), (sg.MeansKind.E_MONEY, False))
        self.assertEqual([e.means_id for e in entries],
                         [self.account.card.means_id, self.account.emoney.means_id],
                         "order 0 is registration order")


class TerminalTest(LiveTestCase):
    """CONFIRM_TERMINAL."""

    def test_confirm_demo_terminal(self):
        status = self.client.confirm_terminal(2, DEMO_TERMINAL)
        self.assertTrue(status.listed)
        self.assertIsNotNone(status.service, "expected an active service")
        self.assertEqual(status.service.discount_kind, sg.DiscountKind.FIXED)
        self.assertEqual((status.service.amount_minor, status.service.currency),
                         (CARD_PROVIDER_DISCOUNT, "JPY"))
        now = sg.now_ms()
        self.assertLessEqual(status.service.valid_from_ms, now)
        self.assertLess(now, status.service.valid_until_ms)

    def test_confirm_unknown_terminal(self):
        status = self.client.confirm_terminal(2, UNKNOWN_TERMINAL)
        self.assertFalse(status.listed)
        self.assertIsNone(status.service)


class AuthorizeTest(LiveTestCase):
    """AUTHORIZE: approval, idempotency, replay, forgery, provider declines."""

    @classmethod
    def setUpClass(cls):
        cls.account = shared_account()

    def sign(self, amount_minor=1980, provider_code=2, **kwargs):
        """A fresh record for the shared account's default (card) means."""
        return self.account.device.sign(amount_minor=amount_minor, provider_code=provider_code,
                                        terminal_id=DEMO_TERMINAL, **kwargs)

    def assert_demo_approval(self, outcome, amount=1980):
        """Approved by provider 2 with the demo terminal's 50 JPY discount."""
        self.assertIsInstance(outcome, sg.Approved, f"declined: {outcome}")
        self.assertEqual(outcome.provider_code, 2)
        self.assertEqual(outcome.amount_requested_minor, amount)
        self.assertEqual(outcome.discount_minor, CARD_PROVIDER_DISCOUNT)
        self.assertEqual(outcome.amount_final_minor, amount - CARD_PROVIDER_DISCOUNT)
        self.assertEqual(outcome.currency, "JPY")
        self.assertEqual(len(outcome.auth_code), 6)

    def test_approved_then_idempotent_then_replayed(self):
        record, client_request_id = self.sign(), sg.new_client_request_id()
        outcome = self.client.authorize(client_request_id, record)
        self.assert_demo_approval(outcome)
        self.assertEqual(outcome.amount_final_minor, 1930)
        again = self.client.authorize(client_request_id, record)
        self.assertEqual(again, outcome, "same request ID + same record must repeat")
        replayed = self.client.authorize(sg.new_client_request_id(), record)
        self.assertEqual(replayed, sg.Declined(sg.Reason.REPLAYED_NONCE))

    def test_idempotent_on_a_new_connection(self):
        record, client_request_id = self.sign(), sg.new_client_request_id()
        outcome = self.client.authorize(client_request_id, record)
        with connect() as other:
            self.assertEqual(other.authorize(client_request_id, record), outcome)

    def test_forged_tag(self):
        record = bytearray(self.sign())
        record[-1] ^= 0x01
        outcome = self.client.authorize(sg.new_client_request_id(), bytes(record))
        self.assertEqual(outcome, sg.Declined(sg.Reason.FORGED_TAG))

    def test_provider_insufficient_funds(self):
        outcome = self.client.authorize(sg.new_client_request_id(),
                                        self.sign(amount_minor=600_000, provider_code=1))
        self.assertEqual(outcome, sg.Declined(sg.Reason.PROVIDER_INSUFFICIENT_FUNDS))

    def test_stale_timestamp(self):
        record = self.sign(timestamp_ms=sg.now_ms() - 60 * 60 * 1000)
        outcome = self.client.authorize(sg.new_client_request_id(), record)
        self.assertEqual(outcome, sg.Declined(sg.Reason.STALE_TIMESTAMP))

    def test_undecodable_inherent_id_is_malformed(self):
        outcome = self.client.authorize(sg.new_client_request_id(), b"\x01\x00")
        self.assertEqual(outcome, sg.Declined(sg.Reason.MALFORMED))

    def test_notice_pushed_to_subscriber(self):
        with connect() as subscriber:
            subscription_id = subscriber.subscribe_notices(self.account.user, PASSWORD)
            client_request_id = sg.new_client_request_id()
            outcome = self.client.authorize(client_request_id, self.sign())
            self.assert_demo_approval(outcome)
            frame, notice = self.next_matching_notice(subscriber, client_request_id)
        self.assertEqual((frame.opcode, frame.status, frame.request_id),
                         (sg.Op.NOTICE, sg.Status.OK, subscription_id))
        self.assertTrue(frame.is_response and frame.is_push)
        self.assertEqual(notice.user, self.account.user)
        self.assertEqual(notice.terminal_id, DEMO_TERMINAL)
        self.assertEqual(notice.outcome, outcome)
        self.assertLess(abs(notice.at_ms - sg.now_ms()), 5 * 60 * 1000)

    @staticmethod
    def next_matching_notice(subscriber, client_request_id, timeout=10.0):
        """The first NOTICE push for ``client_request_id`` (frame, decoded)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = subscriber.next_push(max(0.0, deadline - time.monotonic()))
            notice = sg.decode_notice(frame.body)
            if notice.client_request_id == client_request_id:
                return frame, notice

    def test_pipelined_authorizations(self):
        amounts = [1000 + index for index in range(50)]
        requests = [(sg.Op.AUTHORIZE, sg.encode_authorize(
            sg.new_client_request_id(), self.sign(amount_minor=amount)))
            for amount in amounts]
        frames = self.client.pipeline(requests, timeout=30.0)
        self.assertEqual(len({frame.request_id for frame in frames}), len(amounts))
        for amount, frame in zip(amounts, frames):
            with self.subTest(amount=amount):
                self.assertEqual(frame.opcode, sg.Op.AUTHORIZE)
                self.assert_demo_approval(sg.decode_outcome(sg.ok_body(frame)), amount)


class MalformedInputTest(LiveTestCase):
    """Section 2: framing errors close the connection; other errors do not."""

    def test_bad_header_checksum(self):
        data = bytearray(sg.encode_frame(sg.Op.PING, self.client.next_request_id(), b""))
        data[24] ^= 0xFF  # empty body: nothing unread when the server closes
        self.client.send_raw(bytes(data))
        frame = self.client.recv_frame(5.0)
        self.assertEqual((frame.opcode, frame.status, frame.request_id),
                         (0, sg.Status.FRAME_ERROR, 0))
        reply = sg.decode_status_body(frame.status, frame.body)
        self.assertEqual(reply.frame_error_kind, sg.FrameErrorKind.HEADER_CHECKSUM)
        self.assertTrue(self.client.wait_closed(5.0), "connection left open")
        with connect() as other:
            self.assertEqual(other.ping(b"still here"), b"still here")

    def test_unknown_opcode(self):
        frame = self.client.request(UNKNOWN_OPCODE, b"")
        self.assertEqual(frame.status, sg.Status.UNKNOWN_OPCODE)
        self.assertEqual(frame.body, b"")
        self.assertEqual(self.client.ping(b"after"), b"after")

    def test_unparseable_body_is_bad_request(self):
        frame = self.client.request(sg.Op.CONFIRM_TERMINAL, b"\x00\x00")
        self.assertEqual(frame.status, sg.Status.BAD_REQUEST)
        self.assertEqual(self.client.ping(b"after"), b"after")


if __name__ == "__main__":
    unittest.main()
