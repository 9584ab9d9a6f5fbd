//! `LOGIN` (0x0011): check a password.

use crate::values::password_request;

password_request! {
    /// Check a user's password; an empty reply.
    Login = 0x0011, "login"
}
