//! Per-user completion notices (G3: "the user is notified of completion").
//!
//! Each subscribed user has a bounded broadcast channel; a subscriber that falls more than
//! [`NOTICE_BUFFER`] notices behind loses the oldest and is told how many it missed
//! (`RecvError::Lagged`). Publishing never blocks the authorization path.

use dashmap::DashMap;
use tokio::sync::broadcast;

use crate::limits::NOTICE_BUFFER;
use crate::types::{AuthOutcome, ClientRequestId, UserKey};

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

/// Subscriptions by user.
#[derive(Default)]
pub(crate) struct Notices {
    channels: DashMap<UserKey, broadcast::Sender<Notice>>,
}

impl Notices {
    pub(crate) fn subscribe(&self, user: &UserKey) -> broadcast::Receiver<Notice> {
        self.channels
            .entry(user.clone())
            .or_insert_with(|| broadcast::channel(NOTICE_BUFFER).0)
            .subscribe()
    }

    pub(crate) fn publish(&self, notice: Notice) {
        let user = notice.user.clone();
        let gone = match self.channels.get(&user) {
            None => return,
            Some(sender) => sender.send(notice).is_err(),
        };
        if gone {
            // Nobody listens any more; drop the channel unless someone subscribed meanwhile.
            self.channels.remove_if(&user, |_, sender| sender.receiver_count() == 0);
        }
    }
}
