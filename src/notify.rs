//! systemd's readiness protocol (`sd_notify(3)`): with `Type=notify`, systemd starts the units
//! ordered after this one only once it sends `READY=1`, which `settlegate serve` does when
//! recovery is done and its listeners are bound; `STOPPING=1` when shutdown begins.
//!
//! One datagram to the unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for the Linux
//! abstract namespace). Without the variable (not under systemd, or in a container) every call
//! does nothing. Written on `std` rather than the `sd-notify` crate, whose current release needs
//! a newer Rust than the workspace's `rust-version`.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets to the socket a `Type=notify` service reports to.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Tells systemd the service is ready (`READY=1`, with a `STATUS=` line).
pub fn ready(status: &str) -> io::Result<bool> {
    notify(&format!("READY=1\nSTATUS={status}\n"))
}

/// Tells systemd the service is stopping (`STOPPING=1`).
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1\n")
}

/// Sends `state` (newline-separated `KEY=value` assignments) to `$NOTIFY_SOCKET`. `Ok(false)`
/// when the variable is unset or empty: nothing to tell.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET_ENV) {
        Some(socket) if !socket.is_empty() => {
            send(&socket, state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `state` to the socket `socket` (a path, or `@name` in the abstract namespace).
pub fn send(socket: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(state.as_bytes(), &address)?
        }
        None if bytes.starts_with(b"/") => sender.send_to(state.as_bytes(), socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{NOTIFY_SOCKET_ENV} is neither a path nor @name: {socket:?}"),
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "notification cut short"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        super::send(path.as_os_str(), "READY=1\n").unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("settlegate-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        super::send(format!("@{name}").as_ref(), "STOPPING=1\n").unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_relative_socket_name_is_refused() {
        let error = super::send("notify".as_ref(), "READY=1\n").unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    }
}
