//! Listener hand-over between the palisade process that is running and the one replacing
//! it (SPEC 7: an upgrade or restart loses no request).
//!
//! With SO_REUSEPORT alone, each process has a listening socket of its own on the shared
//! port, and Linux resets the connections still queued on the old one when it closes
//! (unless `net.ipv4.tcp_migrate_req` = 1, off by default). So a running palisade also
//! offers its listening sockets on abstract Unix sockets, one named after each of its
//! listen addresses, and a new one asks under its own addresses for them first
//! (SCM_RIGHTS): any address the two share finds the running one. Both processes then
//! accept from the very same socket, and when the old one stops
//! accepting and closes its copy, what is queued stays queued for the new one. HAProxy
//! (`-x`), nginx (binary upgrade) and Envoy (hot restart) pass their listeners on the
//! same way.
//!
//! Only a process of the same user is served, and only one of the same user is asked:
//! both sides check the peer's credentials. Without a running palisade (or on any
//! failure), the new process binds its addresses itself, as before.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::net::TcpListener;

use crate::config::Config;

/// The most listeners handed over in one go (any beyond are bound afresh).
const MAX_FDS: usize = 64;

/// How long a new process waits for the running one's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// A listener's key: its configured address, and whether it is a TLS one.
pub type Key = (SocketAddr, bool);

/// The listening sockets a process offers, kept current as reloads add and remove them.
pub type Offered = Arc<Mutex<HashMap<Key, Arc<TcpListener>>>>;

/// The abstract socket names under which a process offers its listeners: one after each
/// of its listen addresses (plain or TLS), lowest first. Each serves the same offer, so a
/// new process finds this one under any address the two share.
pub fn names(config: &Config) -> Vec<String> {
    listen_addresses(config).into_iter().map(name_of).collect()
}

fn name_of(addr: SocketAddr) -> String {
    format!("palisade-handover/{addr}")
}

/// Every listen address of `config` (plain and TLS) that names one port, lowest first.
/// Port 0 asks the kernel for any free port: two processes both configured with it
/// share no address, so it is neither offered under nor asked for (were it, a second
/// palisade started on port 0 would take the running one's socket).
fn listen_addresses(config: &Config) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = config
        .server
        .listen
        .iter()
        .copied()
        .chain(config.server.tls.iter().map(|t| t.listen))
        .filter(|addr| addr.port() != 0)
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// The listening sockets that running palisades offer for `config`'s addresses. The
/// names of its addresses are asked lowest first, skipping addresses already taken over:
/// a running process offers under every one of its addresses and answers with all its
/// sockets, so the first address the two share usually brings them all. A running
/// process that does not answer in time is not asked again under its other names.
pub fn take_over(config: &Config) -> HashMap<Key, std::net::TcpListener> {
    let mut taken: HashMap<Key, std::net::TcpListener> = HashMap::new();
    for addr in listen_addresses(config) {
        if taken.keys().any(|(have, _)| *have == addr) {
            continue;
        }
        match fetch(&name_of(addr)) {
            Fetched::Listeners(listeners) => {
                for (key, listener) in listeners {
                    taken.entry(key).or_insert(listener);
                }
            }
            Fetched::Nobody => {}
            // Hung (or stopped): each of its names would cost another wait.
            Fetched::NoAnswer => break,
        }
    }
    taken
}

/// What asking under one name brought.
enum Fetched {
    /// The sockets offered (possibly none).
    Listeners(HashMap<Key, std::net::TcpListener>),
    /// No process offers under the name (or it could not be asked; logged).
    Nobody,
    /// A process holds the name but did not answer within [`ASK_TIMEOUT`] (logged).
    NoAnswer,
}

/// Asks a running palisade for its listening sockets. Every failure is logged and leaves
/// the new process to bind its own.
fn fetch(name: &str) -> Fetched {
    match ask(name) {
        Ok(listeners) => {
            if !listeners.is_empty() {
                tracing::info!(
                    listeners = listeners.len(),
                    name,
                    "took over the listening sockets of the running palisade"
                );
            }
            Fetched::Listeners(listeners)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Fetched::Nobody
        }
        Err(e) => {
            tracing::warn!(error = %e, name, "could not take over the running palisade's listening sockets; binding new ones");
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                Fetched::NoAnswer
            } else {
                Fetched::Nobody
            }
        }
    }
}

fn ask(name: &str) -> io::Result<HashMap<Key, std::net::TcpListener>> {
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    let stream = UnixStream::connect_addr(&addr)?;
    same_user(&stream)?;
    stream.set_read_timeout(Some(ASK_TIMEOUT))?;
    let mut text = vec![0u8; 64 * 1024];
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &stream,
        &mut [io::IoSliceMut::new(&mut text)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    let text = text.get(..received.bytes).unwrap_or_default();
    let text = std::str::from_utf8(text)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "hand-over list is not UTF-8"))?;
    let mut listeners = HashMap::new();
    for (line, fd) in text.lines().zip(fds) {
        let Some(key) = parse_key(line) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad hand-over line {line:?}"),
            ));
        };
        let listener = std::net::TcpListener::from(fd);
        // What it is, not what it is said to be.
        if listener.local_addr()? != key.0 {
            continue;
        }
        listener.set_nonblocking(true)?;
        listeners.insert(key, listener);
    }
    Ok(listeners)
}

/// `plain ADDR` or `tls ADDR`.
fn parse_key(line: &str) -> Option<Key> {
    let (kind, addr) = line.split_once(' ')?;
    let tls = match kind {
        "plain" => false,
        "tls" => true,
        _ => return None,
    };
    Some((addr.parse().ok()?, tls))
}

/// The peer runs as this process's user (or this process is root's and so is the peer).
fn same_user(stream: &UnixStream) -> io::Result<()> {
    let peer = rustix::net::sockopt::get_socket_peercred(stream.as_fd())?;
    if peer.uid != rustix::process::getuid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the hand-over socket belongs to another user (pid {})",
                peer.pid.as_raw_nonzero()
            ),
        ));
    }
    Ok(())
}

/// One hand-over name of a process (see [`names`]), claimed before the process says it is
/// ready, so that a new process started as soon as this one is ready finds it. A new
/// process asking before [`serve`] runs waits in the socket's queue.
#[derive(Debug)]
pub struct Offer {
    name: String,
    /// The bound name; None while the process being replaced still holds it.
    bound: Option<UnixListener>,
}

impl Offer {
    /// Claims `name` if it is free. While a process being replaced still holds it,
    /// [`serve`] keeps trying.
    pub fn claim(name: String) -> Offer {
        let bound = match bind(&name) {
            Ok(listener) => Some(listener),
            Err(e) => {
                if e.kind() != io::ErrorKind::AddrInUse {
                    tracing::debug!(error = %e, "hand-over name not bound yet");
                }
                None
            }
        };
        Offer { name, bound }
    }

    /// The name offered under.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Offers `offered` under `offer`'s name until `stop` says the process is stopping (one
/// task per name, all serving the same `offered`). While another process holds the name
/// (the one this one took over from, until it stops), binding is tried again every
/// second. Sets `handed` once a process took the sockets over.
pub async fn serve(
    offer: Offer,
    offered: Offered,
    mut stop: tokio::sync::watch::Receiver<bool>,
    handed: Arc<AtomicBool>,
) {
    let mut bound = offer.bound;
    let listener = loop {
        let listener = bound.take().map_or_else(|| bind(&offer.name), Ok);
        match listener.and_then(tokio::net::UnixListener::from_std) {
            Ok(listener) => break listener,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot offer the listening sockets for hand-over; a replacing process will bind its own");
                return;
            }
        }
        tokio::select! {
            () = stopping(&mut stop) => return,
            () = tokio::time::sleep(super::REBIND_EVERY) => {}
        }
    };
    loop {
        tokio::select! {
            () = stopping(&mut stop) => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(stream) = stream.into_std() else { continue };
                let offered = offered.clone();
                // Blocking calls, on a socket just connected: quick.
                let sent = tokio::task::spawn_blocking(move || answer(&stream, &offered)).await;
                match sent {
                    Ok(Ok(count)) => {
                        handed.store(true, Ordering::Relaxed);
                        tracing::info!(listeners = count, "handed the listening sockets to a new palisade process");
                    }
                    // It gave up waiting (this process was too slow, or stopped) and
                    // bound its own sockets: nothing lost, nothing to warn about.
                    Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                        tracing::info!(error = %e, "a new process asked for the listening sockets but left before the answer (it binds its own)");
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "listener hand-over failed"),
                    Err(e) => tracing::warn!(error = %e, "listener hand-over failed"),
                }
            }
        }
    }
}

/// Resolves once the process is stopping.
async fn stopping(stop: &mut tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

fn bind(name: &str) -> io::Result<UnixListener> {
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Sends the offered sockets, one line per socket and the sockets themselves alongside.
fn answer(stream: &UnixStream, offered: &Offered) -> io::Result<usize> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(ASK_TIMEOUT))?;
    same_user(stream)?;
    let listeners: Vec<(Key, Arc<TcpListener>)> = match offered.lock() {
        Ok(offered) => offered
            .iter()
            .take(MAX_FDS)
            .map(|(key, listener)| (*key, listener.clone()))
            .collect(),
        Err(_) => return Err(io::Error::other("hand-over list poisoned")),
    };
    let mut text = String::new();
    for ((addr, tls), _) in &listeners {
        text.push_str(if *tls { "tls " } else { "plain " });
        text.push_str(&addr.to_string());
        text.push('\n');
    }
    let fds: Vec<_> = listeners.iter().map(|(_, l)| l.as_fd()).collect();
    let mut space = vec![0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other(
            "too many listeners for one hand-over message",
        ));
    }
    // An empty list still sends one byte's worth of text: a zero-length message with
    // rights attached is not delivered as one.
    if text.is_empty() {
        text.push('\n');
    }
    rustix::net::sendmsg(
        stream,
        &[io::IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(listeners.len())
}
