//! `SUBSCRIBE_NOTICES` (0x0017): subscribe to a user's completion notices
//! ([`Notice`](crate::ops::notice::Notice) pushes follow).

use crate::values::password_request;

password_request! {
    /// Subscribe to a user's completion notices; an empty reply, then the pushes.
    SubscribeNotices = 0x0017, "subscribe_notices"
}
