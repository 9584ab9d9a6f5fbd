//! Per-user completion notices (G3: "the user is notified of completion").
//!
//! Each subscribed user has a bounded broadcast channel; a subscriber that falls more than
//! [`NOTICE_BUFFER`] notices behind loses the oldest and is told how many it missed
//! (`RecvError::Lagged`). Publishing never blocks the authorization path.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;

use crate::limits::NOTICE_BUFFER;
use crate::types::{AuthOutcome, ClientRequestId, UserKey};
use crate::SharedMap;

/// A settlement finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The paying user.
    pub user: UserKey,
    /// The request it answers.
    pub client_request_id: ClientRequestId,
    /// The store terminal.
    pub terminal_id: String,
    /// The outcome.
    pub outcome: AuthOutcome,
    /// When it finished (ms since the epoch).
    pub at_ms: i64,
}

/// A cash-on-delivery notice: a merchant tells the user a parcel is on its way and what is
/// due at the door (C4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryNotice {
    /// The user.
    pub user: UserKey,
    /// The merchant's order reference (a code issued for it must name it).
    pub order_ref: String,
    /// The amount due.
    pub amount_minor: u64,
    /// Its currency.
    pub currency: crate::types::Currency,
    /// The merchant, for display.
    pub merchant: String,
}

/// What reaches one device (C2, C4, C5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMessage {
    /// A payment code issued to this device.
    Code(crate::shard::state::IssuedCode),
    /// A coupon issued to the device's user.
    Coupon(crate::shard::state::IssuedCoupon),
    /// A cash-on-delivery notice for the device's user.
    Delivery(DeliveryNotice),
}

/// Subscriptions by user, and by device.
#[derive(Default)]
pub(crate) struct Notices {
    channels: SharedMap<UserKey, broadcast::Sender<Notice>>,
    /// How many users' channels exist: while none does (most deployments, every benchmark),
    /// a payment's notice costs one atomic load, not a lookup hashing the user.
    channel_count: AtomicUsize,
    devices: SharedMap<crate::types::Idm, broadcast::Sender<DeviceMessage>>,
}

impl Notices {
    pub(crate) fn subscribe(&self, user: &UserKey) -> broadcast::Receiver<Notice> {
        // Counted while the entry is held, so a publish that finds the channel counts it.
        self.channels
            .entry(user.clone())
            .or_insert_with(|| {
                self.channel_count.fetch_add(1, Ordering::Release);
                broadcast::channel(NOTICE_BUFFER).0
            })
            .subscribe()
    }

    pub(crate) fn subscribe_device(
        &self,
        idm: crate::types::Idm,
    ) -> broadcast::Receiver<DeviceMessage> {
        self.devices.entry(idm).or_insert_with(|| broadcast::channel(NOTICE_BUFFER).0).subscribe()
    }

    /// Whether anyone listens to a device's messages.
    pub(crate) fn device_listened(&self, idm: &crate::types::Idm) -> bool {
        self.devices.get(idm).is_some_and(|sender| sender.receiver_count() > 0)
    }

    /// Sends `message` to a device; returns whether anyone was listening.
    pub(crate) fn publish_device(&self, idm: crate::types::Idm, message: DeviceMessage) -> bool {
        let delivered = match self.devices.get(&idm) {
            None => return false,
            Some(sender) => sender.send(message).is_ok(),
        };
        if !delivered {
            self.devices.remove_if(&idm, |_, sender| sender.receiver_count() == 0);
        }
        delivered
    }

    pub(crate) fn publish(&self, notice: Notice) {
        if self.channel_count.load(Ordering::Acquire) == 0 {
            return;
        }
        // Most payments have no subscriber: that costs one lookup, no copy of the user.
        let Some(sender) = self.channels.get(&notice.user) else { return };
        let user = notice.user.clone();
        let gone = sender.send(notice).is_err();
        drop(sender);
        if gone {
            // Nobody listens any more; drop the channel unless someone subscribed meanwhile.
            if self.channels.remove_if(&user, |_, sender| sender.receiver_count() == 0).is_some() {
                self.channel_count.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ReasonCode, UserIdType};

    fn notice(user: &UserKey, id: ClientRequestId) -> Notice {
        Notice {
            user: user.clone(),
            client_request_id: id,
            terminal_id: "T-1".into(),
            outcome: AuthOutcome::Declined(ReasonCode::ProviderDoNotHonor),
            at_ms: 0,
        }
    }

    /// A subscriber gets its user's notices; when the last one goes, the channel goes and the
    /// count with it; a later subscriber is counted and served again.
    #[test]
    fn the_channel_count_follows_subscribers_and_notices_reach_them() {
        let notices = Notices::default();
        let alice = UserKey::new(UserIdType::Mail, "alice@example.com").unwrap();
        let bob = UserKey::new(UserIdType::Mail, "bob@example.com").unwrap();
        notices.publish(notice(&alice, 1));
        let mut receiver = notices.subscribe(&alice);
        let _second = notices.subscribe(&alice);
        assert_eq!(notices.channel_count.load(Ordering::Relaxed), 1);
        notices.publish(notice(&bob, 2));
        notices.publish(notice(&alice, 3));
        assert_eq!(receiver.try_recv().unwrap().client_request_id, 3);
        assert!(receiver.try_recv().is_err(), "bob's notice is not alice's");
        drop((receiver, _second));
        notices.publish(notice(&alice, 4));
        assert_eq!(notices.channel_count.load(Ordering::Relaxed), 0);
        assert!(notices.channels.is_empty());
        let mut again = notices.subscribe(&alice);
        notices.publish(notice(&alice, 5));
        assert_eq!(again.try_recv().unwrap().client_request_id, 5);
    }
}
