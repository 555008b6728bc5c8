//! WebSocket tunnels: after a backend's `101`, bytes copied both ways between the client's
//! connection and the backend's.
//!
//! The tunnel runs in the client connection's own task, so it stays what it is to the
//! rest of the server: one of `palisade_connections_active`, a slot under
//! `max_connections` (never evicted as idle), work a drain waits for up to
//! `server.timeouts.shutdown`, and a connection held to `server.timeouts.idle` (no byte
//! either way for that long closes it, like nginx's `proxy_read_timeout`).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::h1::Io;

/// The backend's end of a tunnel.
pub enum BackendEnd {
    /// palisade's own codec: the socket, and what the backend sent past its 101 head.
    Socket(TcpStream, Bytes),
    /// hyper's client (TLS upstreams): the connection, once hyper hands it over.
    Hyper(hyper::upgrade::OnUpgrade),
}

/// Where the handler leaves the backend's end of a tunnel for the client's connection,
/// which writes the `101` and then runs the tunnel. palisade's HTTP/1.1 codec puts one on
/// every WebSocket upgrade request (shared only because request extensions must be
/// `Clone`); HTTP/2 requests never upgrade.
#[derive(Clone, Default)]
pub struct OnUpgrade(Arc<Mutex<Option<BackendEnd>>>);

impl OnUpgrade {
    /// Hands the backend's end over: the response going back is the `101`.
    pub fn attach(&self, end: BackendEnd) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(end);
        }
    }

    /// The backend's end, if the handler attached one.
    pub(super) fn take(&self) -> Option<BackendEnd> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Copies bytes both ways until either side closes its end (then the other is closed too,
/// as nginx does: a half-closed WebSocket has nothing more to say). `early`: what the
/// client sent past its request head (the first bytes of the new protocol), which the
/// backend gets first.
pub(super) async fn run(mut client: Io, early: Bytes, backend: BackendEnd) -> std::io::Result<()> {
    match backend {
        BackendEnd::Socket(mut socket, backend_early) => {
            if !backend_early.is_empty() {
                client.write_all(&backend_early).await?;
            }
            if !early.is_empty() {
                socket.write_all(&early).await?;
            }
            pipe(client, socket).await
        }
        BackendEnd::Hyper(upgrade) => {
            let mut backend = match upgrade.await {
                Ok(backend) => TokioIo::new(backend),
                Err(e) => return Err(std::io::Error::other(e)),
            };
            if !early.is_empty() {
                backend.write_all(&early).await?;
            }
            pipe(client, backend).await
        }
    }
}

/// Both directions, until the first of them ends.
async fn pipe<B>(client: Io, backend: B) -> std::io::Result<()>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);
    let up = async {
        tokio::io::copy(&mut client_read, &mut backend_write).await?;
        backend_write.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut backend_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    tokio::select! {
        done = up => done,
        done = down => done,
    }
}
