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

import dataclasses
import datetime
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


# --------------------------------------------------------------------------
# Age check: REGISTER_AGE, SET_AGE_POLICY, AUTHORIZE_BASKET (section 5)
# --------------------------------------------------------------------------

DAY_MS = 86_400_000
AGE_PROVIDER = 1            # the card acquirer: declines 2% with reason 21
STORE_DISCOUNT_BPS = 1000   # 10% off at our own store terminals
ADULT_BIRTH = (1980, 5, 5)
MINOR_BIRTH = (2015, 5, 5)
BEER = sg.BasketItem("BEER-350", "alcohol", 2, 490)
CIGARETTES = sg.BasketItem("CIG-20", "tobacco", 1, 600)
BENTO = sg.BasketItem("BENTO-01", "", 1, 1000)
WATER = sg.BasketItem("WATER-500", "drinks", 3, 100)
REFUSE_JP = sg.AgePolicy("JP", "Asia/Tokyo", sg.OnFailure.REFUSE, False)
REMOVE_JP = sg.AgePolicy("JP", "Asia/Tokyo", sg.OnFailure.REMOVE_ITEMS, False)
STRICT_JP = sg.AgePolicy("JP", "Asia/Tokyo", sg.OnFailure.REFUSE, True)


def basket_total(items):
    """The sum of ``quantity × unit_amount_minor``."""
    return sum(item.total_minor for item in items)


def new_store(client, policy=None):
    """A fresh store terminal listed at provider 1 with 10% off, and its policy."""
    terminal_id = f"PY-AGE-{uuid.uuid4().hex[:8].upper()}"
    now = sg.now_ms()
    service = sg.Service.percent(STORE_DISCOUNT_BPS, now - DAY_MS, now + 30 * DAY_MS,
                                 "spec test 10%")
    client.register_terminals(sg.new_client_request_id(), AGE_PROVIDER,
                              [sg.TerminalEntry(terminal_id, service)])
    if policy is not None:
        client.set_age_policy(sg.new_client_request_id(), AGE_PROVIDER, terminal_id, policy)
    return terminal_id


def new_device(client, birth_date=None):
    """A freshly enrolled user's device (card as default), age-registered if asked."""
    user = fresh_user()
    credential = client.enroll(sg.new_client_request_id(), user, PASSWORD, fresh_card_idm())
    client.add_means(sg.new_client_request_id(), user, sg.CreditCard(PAN), make_default=True)
    device = sg.Device(user, credential)
    if birth_date is not None:
        client.register_age(sg.new_client_request_id(), device.sign_age(birth_date=birth_date))
    return device


def years_before(day, years):
    """``day`` moved back ``years`` calendar years (29 February becomes 28)."""
    try:
        return day.replace(year=day.year - years)
    except ValueError:
        return day.replace(year=day.year - years, day=28)


class AgeTestCase(LiveTestCase):
    """Helpers for the age-check tests."""

    def pay(self, device, terminal_id, items, *, flag=True, amount=None, attempts=5):
        """``AUTHORIZE_BASKET`` of a fresh inherent ID for ``items``.

        The card acquirer declines 2% of payments at random (reason 21); such a
        decline is retried with a new record, so a test sees the age logic only.
        """
        amount = basket_total(items) if amount is None else amount
        for _ in range(attempts):
            record = device.sign(amount_minor=amount, provider_code=AGE_PROVIDER,
                                 terminal_id=terminal_id)
            reply = self.client.authorize_basket(sg.new_client_request_id(), record, items,
                                                 age_confirmation=flag)
            if reply.outcome != sg.Declined(sg.Reason.PROVIDER_DO_NOT_HONOR):
                return reply
        return reply

    def assert_settled(self, reply, amount, age_check, item_ids=()):
        """Approved for ``amount`` (10% off), with that verdict."""
        self.assertIsInstance(reply.outcome, sg.Approved, f"declined: {reply}")
        discount = amount * STORE_DISCOUNT_BPS // 10000
        self.assertEqual((reply.outcome.provider_code, reply.outcome.amount_requested_minor,
                          reply.outcome.discount_minor, reply.outcome.amount_final_minor,
                          reply.outcome.currency),
                         (AGE_PROVIDER, amount, discount, amount - discount, "JPY"))
        self.assert_verdict(reply.verdict, sg.AgeVerdict(age_check, amount, tuple(item_ids)))

    def assert_verdict(self, verdict, expected):
        """``verdict`` equals ``expected``; the order of the item IDs is not
        specified, so they are compared as sorted lists."""
        self.assertIsNotNone(verdict, "no verdict")
        self.assertEqual((verdict.age_check, verdict.amount_minor, sorted(verdict.item_ids)),
                         (expected.age_check, expected.amount_minor, sorted(expected.item_ids)))

    def assert_age_declined(self, reply, item_ids):
        """Declined with reason 70, naming ``item_ids``; nothing settled."""
        self.assertEqual(reply.outcome, sg.Declined(sg.Reason.AGE_CONDITION_NOT_MET))
        self.assert_verdict(reply.verdict, sg.AgeVerdict(sg.AgeCheck.FAILED, 0, tuple(item_ids)))

    def assert_refused(self, call, reason, *args):
        """``call(*args)`` answers ``REFUSED`` with ``reason``."""
        with self.assertRaises(sg.StatusError) as caught:
            call(*args)
        self.assertEqual((caught.exception.status, caught.exception.reason),
                         (sg.Status.REFUSED, reason))


class RegisterAgeTest(AgeTestCase):
    """REGISTER_AGE: the signed age record and its refusals."""

    def setUp(self):
        super().setUp()
        self.device = new_device(self.client)

    def register(self, **kwargs):
        """Register a freshly signed record (see ``Device.age_fields``)."""
        kwargs.setdefault("birth_date", ADULT_BIRTH)
        self.client.register_age(sg.new_client_request_id(), self.device.sign_age(**kwargs))

    def refused(self, reason, record):
        """REGISTER_AGE of ``record`` is refused with ``reason``."""
        self.assert_refused(self.client.register_age, reason, sg.new_client_request_id(), record)

    def sign_fields(self, **changes):
        """A record of this device's fields with ``changes``, signed with its key."""
        fields = dataclasses.replace(self.device.age_fields(birth_date=ADULT_BIRTH), **changes)
        return sg.sign_age_record(fields, self.device.credential.device_key)

    def test_register_adult_and_minor(self):
        self.register(birth_date=ADULT_BIRTH)
        minor = new_device(self.client)
        self.client.register_age(sg.new_client_request_id(),
                                 minor.sign_age(birth_date=MINOR_BIRTH))

    def test_register_with_inherent_number_user(self):
        user = sg.User.number(str(uuid.uuid4().int)[:20])
        credential = self.client.enroll(sg.new_client_request_id(), user, PASSWORD,
                                        fresh_card_idm())
        device = sg.Device(user, credential)
        self.client.register_age(sg.new_client_request_id(),
                                 device.sign_age(birth_date=(1900, 1, 1),
                                                 method=sg.VerificationMethod.EKYC))

    def test_retry_same_request_returns_first_outcome(self):
        record, client_request_id = self.device.sign_age(birth_date=ADULT_BIRTH), \
            sg.new_client_request_id()
        self.client.register_age(client_request_id, record)
        self.client.register_age(client_request_id, record)

    def test_forged_age_record(self):
        record = bytearray(self.device.sign_age(birth_date=ADULT_BIRTH))
        record[-1] ^= 0x01
        self.refused(sg.Reason.FORGED_TAG, bytes(record))
        # the birth date is covered by the tag, too
        record = bytearray(self.device.sign_age(birth_date=MINOR_BIRTH))
        record[13 + len(self.device.user.user_id.encode())] ^= 0x01
        self.refused(sg.Reason.FORGED_TAG, bytes(record))

    def test_replayed_age_record(self):
        record = self.device.sign_age(birth_date=ADULT_BIRTH)
        self.client.register_age(sg.new_client_request_id(), record)
        self.refused(sg.Reason.REPLAYED_NONCE, record)

    def test_counter_shared_with_inherent_ids(self):
        counter = self.device.next_counter()
        self.register(counter=counter)
        store = new_store(self.client)
        record = self.device.sign(amount_minor=1000, provider_code=AGE_PROVIDER,
                                  terminal_id=store, counter=counter)
        reply = self.client.authorize_basket(sg.new_client_request_id(), record, [BENTO])
        self.assertEqual(reply, sg.BasketReply(sg.Declined(sg.Reason.REPLAYED_NONCE), None))

    def test_record_that_does_not_decode(self):
        record = self.device.sign_age(birth_date=ADULT_BIRTH)
        self.refused(sg.Reason.MALFORMED, record[:-1])
        self.refused(sg.Reason.MALFORMED, b"")
        self.refused(sg.Reason.MALFORMED, self.sign_fields(format=sg.INHERENT_ID_FORMAT))

    def test_unknown_device(self):
        self.refused(sg.Reason.UNKNOWN_DEVICE, self.sign_fields(card_idm=fresh_card_idm()))

    def test_unknown_key_version(self):
        self.refused(sg.Reason.KEY_VERSION_INVALID,
                     self.sign_fields(key_version=self.device.credential.key_version + 7))

    def test_device_of_another_user(self):
        other = new_device(self.client)
        self.refused(sg.Reason.USER_DEVICE_MISMATCH, self.sign_fields(user=other.user))

    def test_stale_timestamp(self):
        self.refused(sg.Reason.STALE_TIMESTAMP,
                     self.sign_fields(timestamp_ms=sg.now_ms() - 60 * 60 * 1000))

    def test_invalid_registrations(self):
        now = sg.now_ms()
        next_year = time.gmtime().tm_year + 1
        cases = {
            "30 February": dict(birth_year=1980, birth_month=2, birth_day=30),
            "29 February of a common year": dict(birth_year=1981, birth_month=2, birth_day=29),
            "month 13": dict(birth_month=13),
            "day 0": dict(birth_day=0),
            "born 1899": dict(birth_year=1899, birth_month=12, birth_day=31),
            "born in the future": dict(birth_year=next_year),
            "verification method 0": dict(method=0),
            "verification method 4": dict(method=4),
            "verified a day from now": dict(verified_at_ms=now + DAY_MS,
                                            valid_until_ms=now + 30 * DAY_MS),
            "valid_until in the past": dict(valid_until_ms=now - 1000),
            "valid_until not after verified_at": dict(verified_at_ms=now + 2 * DAY_MS,
                                                      valid_until_ms=now + DAY_MS),
            "valid 401 days": dict(valid_until_ms=now + 401 * DAY_MS),
        }
        for label, changes in cases.items():
            with self.subTest(label):
                self.refused(sg.Reason.INVALID_AGE_REGISTRATION, self.sign_fields(**changes))

    def test_valid_edges_accepted(self):
        now = sg.now_ms()
        self.register(birth_date=(1900, 1, 1))
        self.register(birth_date=(2000, 2, 29), valid_until_ms=now + 399 * DAY_MS)

    def test_newer_registration_replaces_older(self):
        store = new_store(self.client, REFUSE_JP)
        self.register(birth_date=ADULT_BIRTH)
        self.assert_settled(self.pay(self.device, store, [BEER]), BEER.total_minor,
                            sg.AgeCheck.PASSED)
        self.register(birth_date=MINOR_BIRTH)
        self.assert_age_declined(self.pay(self.device, store, [BEER]), [BEER.item_id])

    def test_expired_registration_fails(self):
        store = new_store(self.client, REFUSE_JP)
        self.register(birth_date=ADULT_BIRTH, valid_until_ms=sg.now_ms() + 2500)
        self.assert_settled(self.pay(self.device, store, [BEER]), BEER.total_minor,
                            sg.AgeCheck.PASSED)
        time.sleep(3.0)
        self.assert_age_declined(self.pay(self.device, store, [BEER]), [BEER.item_id])


class SetAgePolicyTest(AgeTestCase):
    """SET_AGE_POLICY: refusals and clearing."""

    def setUp(self):
        super().setUp()
        self.store = new_store(self.client)

    def set_policy(self, policy, terminal_id=None, provider_code=AGE_PROVIDER):
        """SET_AGE_POLICY for our store."""
        self.client.set_age_policy(sg.new_client_request_id(), provider_code,
                                   terminal_id or self.store, policy)

    def test_policies_accepted(self):
        for policy in (REFUSE_JP, REMOVE_JP, STRICT_JP,
                       sg.AgePolicy("US", "America/New_York", sg.OnFailure.REMOVE_ITEMS, True),
                       None):
            with self.subTest(policy=policy):
                self.set_policy(policy)

    def test_unknown_time_zone(self):
        self.assert_refused(self.set_policy, sg.Reason.INVALID_AGE_POLICY,
                            sg.AgePolicy("JP", "Mars/Olympus_Mons"))
        self.assert_refused(self.set_policy, sg.Reason.INVALID_AGE_POLICY,
                            sg.AgePolicy("JP", ""))

    def test_unknown_jurisdiction(self):
        self.assert_refused(self.set_policy, sg.Reason.INVALID_AGE_POLICY,
                            sg.AgePolicy("XX", "Asia/Tokyo"))

    def test_terminal_not_listed(self):
        self.assert_refused(self.set_policy, sg.Reason.INVALID_TERMINAL,
                            REFUSE_JP, UNKNOWN_TERMINAL)
        # listed at provider 1 only
        self.assert_refused(self.set_policy, sg.Reason.INVALID_TERMINAL, REFUSE_JP, None, 2)

    def test_provider_outside_scope_is_forbidden(self):
        with self.assertRaises(sg.StatusError) as caught:
            self.set_policy(REFUSE_JP, provider_code=99)
        self.assertEqual(caught.exception.status, sg.Status.FORBIDDEN)
        self.assertEqual(self.client.ping(b"open"), b"open")

    def test_bad_enum_bytes_are_bad_request(self):
        prefix = (sg.BodyWriter().u128(sg.new_client_request_id()).u32(AGE_PROVIDER)
                  .str8(self.store))
        bodies = {
            "has_policy 2": prefix.getvalue() + b"\x02",
            "on_failure 3": prefix.getvalue() + sg.BodyWriter().u8(1).str8("JP")
            .str8("Asia/Tokyo").u8(3).u8(0).getvalue(),
            "strict 2": prefix.getvalue() + sg.BodyWriter().u8(1).str8("JP")
            .str8("Asia/Tokyo").u8(1).u8(2).getvalue(),
        }
        for label, body in bodies.items():
            with self.subTest(label):
                frame = self.client.request(sg.Op.SET_AGE_POLICY, body)
                self.assertEqual(frame.status, sg.Status.BAD_REQUEST)

    def test_clearing_restores_default_refuse(self):
        minor = new_device(self.client, MINOR_BIRTH)
        self.set_policy(REMOVE_JP)
        self.assert_settled(self.pay(minor, self.store, [BEER, BENTO]), BENTO.total_minor,
                            sg.AgeCheck.FAILED, [BEER.item_id])
        self.set_policy(None)  # default: JP, Asia/Tokyo, refuse, not strict
        self.assert_age_declined(self.pay(minor, self.store, [BEER, BENTO]), [BEER.item_id])

    def test_new_opcodes_need_authentication(self):
        with connect(authenticated=False) as anonymous:
            for opcode, body in (
                    (sg.Op.REGISTER_AGE, sg.encode_register_age(1, b"\xa1")),
                    (sg.Op.SET_AGE_POLICY, sg.encode_set_age_policy(1, 1, self.store, None)),
                    (sg.Op.AUTHORIZE_BASKET,
                     sg.encode_authorize_basket(1, b"\x01", [BENTO]))):
                with self.subTest(opcode=hex(opcode)):
                    self.assertEqual(anonymous.request(opcode, body).status,
                                     sg.Status.UNAUTHENTICATED)


class AuthorizeBasketTest(AgeTestCase):
    """AUTHORIZE_BASKET: the rules of section 5, in order."""

    @classmethod
    def setUpClass(cls):
        with connect() as client:
            cls.adult = new_device(client, ADULT_BIRTH)
            cls.minor = new_device(client, MINOR_BIRTH)
            cls.unregistered = new_device(client)
            cls.refuse_store = new_store(client, REFUSE_JP)
            cls.remove_store = new_store(client, REMOVE_JP)
            cls.strict_store = new_store(client, STRICT_JP)

    # policy remove_items

    def test_remove_items_minor(self):
        reply = self.pay(self.minor, self.remove_store, [BEER, BENTO, CIGARETTES, WATER])
        self.assert_settled(reply, BENTO.total_minor + WATER.total_minor, sg.AgeCheck.FAILED,
                            [BEER.item_id, CIGARETTES.item_id])

    def test_remove_items_nothing_left(self):
        self.assert_age_declined(self.pay(self.minor, self.remove_store, [BEER, CIGARETTES]),
                                 [BEER.item_id, CIGARETTES.item_id])

    def test_remove_items_adult(self):
        self.assert_settled(self.pay(self.adult, self.remove_store, [BEER, BENTO]),
                            basket_total([BEER, BENTO]), sg.AgeCheck.PASSED)

    # policy refuse

    def test_refuse_minor(self):
        self.assert_age_declined(self.pay(self.minor, self.refuse_store, [BEER, BENTO]),
                                 [BEER.item_id])

    def test_refuse_unregistered(self):
        self.assert_age_declined(self.pay(self.unregistered, self.refuse_store,
                                          [BENTO, CIGARETTES]), [CIGARETTES.item_id])

    def test_adult_passes(self):
        self.assert_settled(self.pay(self.adult, self.refuse_store, [BEER, BENTO, CIGARETTES]),
                            basket_total([BEER, BENTO, CIGARETTES]), sg.AgeCheck.PASSED)

    def test_store_without_own_policy_uses_default_refuse(self):
        store = new_store(self.client)
        self.assert_age_declined(self.pay(self.minor, store, [BEER, BENTO]), [BEER.item_id])

    # flag and strict mode

    def test_no_flag_not_checked(self):
        for store in (self.refuse_store, self.remove_store):
            with self.subTest(store=store):
                self.assert_settled(self.pay(self.minor, store, [BEER, BENTO], flag=False),
                                    basket_total([BEER, BENTO]), sg.AgeCheck.NOT_CHECKED)

    def test_flag_without_restricted_items(self):
        self.assert_settled(self.pay(self.unregistered, self.refuse_store, [BENTO, WATER]),
                            basket_total([BENTO, WATER]), sg.AgeCheck.NO_RESTRICTED_ITEMS)

    def test_strict_checks_without_flag(self):
        self.assert_age_declined(self.pay(self.minor, self.strict_store, [BEER, BENTO],
                                          flag=False), [BEER.item_id])
        self.assert_settled(self.pay(self.adult, self.strict_store, [BEER, BENTO], flag=False),
                            basket_total([BEER, BENTO]), sg.AgeCheck.PASSED)
        self.assert_settled(self.pay(self.minor, self.strict_store, [BENTO], flag=False),
                            BENTO.total_minor, sg.AgeCheck.NO_RESTRICTED_ITEMS)

    def test_strict_declines_plain_authorize(self):
        record = self.adult.sign(amount_minor=1000, provider_code=AGE_PROVIDER,
                                 terminal_id=self.strict_store)
        outcome = self.client.authorize(sg.new_client_request_id(), record)
        self.assertEqual(outcome, sg.Declined(sg.Reason.BASKET_MISMATCH))

    def test_plain_authorize_at_non_strict_store(self):
        record = self.minor.sign(amount_minor=1000, provider_code=AGE_PROVIDER,
                                 terminal_id=self.refuse_store)
        for _ in range(5):
            outcome = self.client.authorize(sg.new_client_request_id(), record)
            if outcome != sg.Declined(sg.Reason.PROVIDER_DO_NOT_HONOR):
                break
            record = self.minor.sign(amount_minor=1000, provider_code=AGE_PROVIDER,
                                     terminal_id=self.refuse_store)
        self.assertIsInstance(outcome, sg.Approved, f"declined: {outcome}")

    # jurisdiction and time zone

    def test_jurisdiction_minimum_age(self):
        # 20 and a half: old enough in JP (20), not in US (21).
        today = datetime.date.today()
        birth = years_before(today, 20) - datetime.timedelta(days=182)
        device = new_device(self.client, (birth.year, birth.month, birth.day))
        self.assert_settled(self.pay(device, self.refuse_store, [BEER]), BEER.total_minor,
                            sg.AgeCheck.PASSED)
        us_store = new_store(self.client, sg.AgePolicy("US", "America/New_York",
                                                       sg.OnFailure.REFUSE, False))
        self.assert_age_declined(self.pay(device, us_store, [BEER]), [BEER.item_id])

    def test_age_counted_in_store_time_zone(self):
        # Deliberately on the threshold: the 20th birthday is today in
        # Kiritimati (UTC+14) and still ahead in Pago Pago (UTC-11); the two
        # local dates always differ (25 hours apart).
        now = datetime.datetime.now(datetime.timezone.utc)
        east = (now + datetime.timedelta(hours=14)).date()
        west = (now - datetime.timedelta(hours=11)).date()
        self.assertNotEqual(east, west)
        birth = years_before(east, 20)
        if (birth.month, birth.day) != (east.month, east.day):
            self.skipTest("birthday on 29 February: the rule under test is another one")
        device = new_device(self.client, (birth.year, birth.month, birth.day))
        kiritimati = new_store(self.client, sg.AgePolicy("JP", "Pacific/Kiritimati"))
        pago_pago = new_store(self.client, sg.AgePolicy("JP", "Pacific/Pago_Pago"))
        self.assert_settled(self.pay(device, kiritimati, [BEER]), BEER.total_minor,
                            sg.AgeCheck.PASSED)
        self.assert_age_declined(self.pay(device, pago_pago, [BEER]), [BEER.item_id])

    # declines before the basket is looked at

    def test_basket_that_does_not_add_up(self):
        for amount in (basket_total([BEER, BENTO]) - 1, basket_total([BEER, BENTO]) + 1):
            with self.subTest(amount=amount):
                reply = self.pay(self.adult, self.refuse_store, [BEER, BENTO], amount=amount)
                self.assertEqual(reply, sg.BasketReply(
                    sg.Declined(sg.Reason.BASKET_MISMATCH), None))

    def test_forged_inherent_id_has_no_verdict(self):
        record = bytearray(self.adult.sign(amount_minor=BEER.total_minor,
                                           provider_code=AGE_PROVIDER,
                                           terminal_id=self.refuse_store))
        record[-1] ^= 0x01
        reply = self.client.authorize_basket(sg.new_client_request_id(), bytes(record), [BEER],
                                             age_confirmation=True)
        self.assertEqual(reply, sg.BasketReply(sg.Declined(sg.Reason.FORGED_TAG), None))

    def test_undecodable_inherent_id_is_malformed(self):
        reply = self.client.authorize_basket(sg.new_client_request_id(), b"\x01\x00", [BEER],
                                             age_confirmation=True)
        self.assertEqual(reply, sg.BasketReply(sg.Declined(sg.Reason.MALFORMED), None))

    def test_replayed_inherent_id(self):
        record = self.adult.sign(amount_minor=BENTO.total_minor, provider_code=AGE_PROVIDER,
                                 terminal_id=self.refuse_store)
        self.client.authorize_basket(sg.new_client_request_id(), record, [BENTO])
        reply = self.client.authorize_basket(sg.new_client_request_id(), record, [BENTO])
        self.assertEqual(reply, sg.BasketReply(sg.Declined(sg.Reason.REPLAYED_NONCE), None))

    # idempotency

    def test_retry_returns_first_reply(self):
        for device in (self.adult, self.minor):
            with self.subTest(device=device.user.user_id):
                record = device.sign(amount_minor=basket_total([BEER, BENTO]),
                                     provider_code=AGE_PROVIDER, terminal_id=self.refuse_store)
                client_request_id = sg.new_client_request_id()
                first = self.client.authorize_basket(client_request_id, record, [BEER, BENTO],
                                                     age_confirmation=True)
                again = self.client.authorize_basket(client_request_id, record, [BEER, BENTO],
                                                     age_confirmation=True)
                self.assertEqual(again, first)

    def test_same_request_id_other_basket_conflicts(self):
        items = [BEER, BENTO]
        record = self.adult.sign(amount_minor=basket_total(items), provider_code=AGE_PROVIDER,
                                 terminal_id=self.refuse_store)
        client_request_id = sg.new_client_request_id()
        self.client.authorize_basket(client_request_id, record, items, age_confirmation=True)
        other = [sg.BasketItem("OTHER-1", "", 1, basket_total(items))]
        reply = self.client.authorize_basket(client_request_id, record, other,
                                             age_confirmation=True)
        self.assertEqual(reply.outcome, sg.Declined(sg.Reason.IDEMPOTENCY_CONFLICT))

    # body limits

    def test_bad_shape_is_bad_request(self):
        record = self.adult.sign(amount_minor=1, provider_code=AGE_PROVIDER,
                                 terminal_id=self.refuse_store)
        item = sg.BasketItem("ONE", "", 1, 1)
        cases = {
            "item_count 0": dict(items=[], flags=1),
            "item_count 257": dict(items=[item] * 257, flags=1),
            "flags bit 1": dict(items=[item], flags=0x03),
            "flags bit 7": dict(items=[item], flags=0x80),
        }
        for label, case in cases.items():
            with self.subTest(label):
                body = sg.encode_authorize_basket(sg.new_client_request_id(), record,
                                                  case["items"], flags=case["flags"],
                                                  validate=False)
                frame = self.client.request(sg.Op.AUTHORIZE_BASKET, body)
                self.assertEqual(frame.status, sg.Status.BAD_REQUEST)
        self.assertEqual(self.client.ping(b"still open"), b"still open")

    def test_item_limits_refused(self):
        # Section 5 gives the limits but not the answer: BAD_REQUEST (section
        # 4, "breaks a limit") or a decline 71 ("the basket is invalid",
        # section 6). Either is accepted here; the server declines 71.
        cases = {
            "empty item ID": sg.BasketItem("", "", 1, 100),
            "33-byte item ID": sg.BasketItem("I" * 33, "", 1, 100),
            "17-byte category": sg.BasketItem("A", "a" * 17, 1, 100),
            "upper-case category": sg.BasketItem("A", "Alcohol", 1, 100),
            "quantity 0": sg.BasketItem("A", "", 0, 100),
            "quantity 1,000,001": sg.BasketItem("A", "", 1_000_001, 1),
        }
        for label, item in cases.items():
            with self.subTest(label):
                amount = max(item.total_minor, 100)
                record = self.adult.sign(amount_minor=amount, provider_code=AGE_PROVIDER,
                                         terminal_id=self.refuse_store)
                body = sg.encode_authorize_basket(sg.new_client_request_id(), record, [item],
                                                  validate=False)
                frame = self.client.request(sg.Op.AUTHORIZE_BASKET, body)
                if frame.status == sg.Status.OK:
                    self.assertEqual(sg.decode_basket_reply(frame.body), sg.BasketReply(
                        sg.Declined(sg.Reason.BASKET_MISMATCH), None))
                else:
                    self.assertEqual(frame.status, sg.Status.BAD_REQUEST)

    def test_item_count_bounds_accepted(self):
        many = [sg.BasketItem(f"ITEM-{index}", "", 1, 10) for index in range(256)]
        self.assert_settled(self.pay(self.adult, self.refuse_store, many), 2560,
                            sg.AgeCheck.NO_RESTRICTED_ITEMS)



if __name__ == "__main__":
    unittest.main()
