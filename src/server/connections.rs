//! The connection limit: a listener that holds one slot per open connection. Past the limit a
//! new connection is answered at once with a 503 and closed, rather than left waiting in the
//! kernel's backlog. Every close the server starts lingers (see [`linger`]). Also names the
//! peer's address for per-client limits ([`PeerAddr`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The client's address, for handlers and middleware (`ConnectInfo<PeerAddr>`).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// How long a refused connection may take to send its request head (hyper's default header
/// read timeout). A client starved of CPU may need seconds; closing earlier would lose its
/// answer.
const REFUSAL_HEAD_WAIT: Duration = Duration::from_secs(30);
/// Refusals in progress at once. Past that the listener stops accepting, and new connections
/// wait in the kernel's backlog (as nginx does at its connection limit): refusing cannot use
/// unbounded file descriptors, and no connection is ever closed unanswered.
const MAX_REFUSALS: usize = 256;
/// At most one warning per this long while the limit holds.
const WARN_EVERY: Duration = Duration::from_secs(10);

pub struct Limited<L> {
    inner: L,
    slots: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    max: usize,
    warned: Option<Instant>,
}

impl<L> Limited<L> {
    pub fn new(inner: L, max: usize) -> Self {
        Self {
            inner,
            slots: Arc::new(Semaphore::new(max)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS)),
            max,
            warned: None,
        }
    }
}

impl<L> Listener for Limited<L>
where
    L: Listener<Addr = SocketAddr>,
{
    type Io = Guarded<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // At the limit, hold a refusal permit before accepting, so an accepted connection
            // can always be answered.
            let mut refusal = if self.slots.available_permits() == 0 {
                Some(permit(self.refusals.clone()).await)
            } else {
                None
            };
            let (io, addr) = self.inner.accept().await;
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                return (Guarded::new(io, slot), addr);
            }
            if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                tracing::warn!(max = self.max, "connection limit reached; refusing");
                self.warned = Some(Instant::now());
            }
            let held = match refusal.take() {
                Some(held) => held,
                None => permit(self.refusals.clone()).await,
            };
            let max = self.max;
            tokio::spawn(async move {
                refuse(io, max).await;
                drop(held);
            });
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

async fn permit(semaphore: Arc<Semaphore>) -> OwnedSemaphorePermit {
    semaphore
        .acquire_owned()
        .await
        .expect("the refusal semaphore is never closed")
}

/// A minimal HTTP/1.1 503 for a connection over the limit, sent once the request's head has
/// arrived (an answer before the request confuses HTTP clients that pool connections). The
/// request is never parsed, so the error takes the OpenAI shape, the API most clients speak.
/// The close lingers: closing with the request's body unread would send a reset, and the client
/// might never see the answer.
async fn refuse<Io: AsyncRead + AsyncWrite + Unpin>(mut io: Io, max: usize) {
    let mut head = Vec::with_capacity(1024);
    let read_head = async {
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(REFUSAL_HEAD_WAIT, read_head).await,
        Ok(true)
    ) {
        return;
    }
    let body = format!(
        "{{\"error\":{{\"message\":\"the server has {max} open connections, its limit; retry \
         later\",\"type\":\"overloaded_error\",\"param\":null,\"code\":\"too_many_connections\"}}}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    linger(io).await;
}

/// How long a closing connection's unread bytes are read and dropped, at most.
const LINGER: Duration = Duration::from_secs(5);
/// How many unread bytes a closing connection reads and drops, at most.
const LINGER_BYTES: usize = 64 << 20;

/// Closes a connection the server is done with, as nginx's lingering close does: the write
/// side first, then whatever the client still sends is read and dropped until it closes too (or
/// [`LINGER`] passes). Closing with unread bytes would send a reset instead, and the reset can
/// destroy the last response before the client reads it: a 413 for a body still arriving, or
/// the 503 of a refused connection.
async fn linger<Io: AsyncRead + AsyncWrite + Unpin>(mut io: Io) {
    let _ = io.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// A connection holding its slot until it closes. A close the server starts lingers, holding
/// the slot, so lingering cannot use more descriptors than the limit allows.
pub struct Guarded<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `None` only once dropped.
    io: Option<Io>,
    slot: Option<OwnedSemaphorePermit>,
    /// The client closed its side (or the connection failed): nothing is left to linger over.
    client_closed: bool,
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> Guarded<Io> {
    fn new(io: Io, slot: OwnedSemaphorePermit) -> Self {
        Self {
            io: Some(io),
            slot: Some(slot),
            client_closed: false,
        }
    }

    fn io(&mut self) -> Pin<&mut Io> {
        Pin::new(
            self.io
                .as_mut()
                .expect("the connection is open until dropped"),
        )
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Guarded<Io> {
    fn drop(&mut self) {
        if self.client_closed {
            return;
        }
        let (Some(io), Ok(runtime)) = (self.io.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let slot = self.slot.take();
        runtime.spawn(async move {
            linger(io).await;
            drop(slot);
        });
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Guarded<Io> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = this.io().poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if buf.filled().len() == before => this.client_closed = true,
            Poll::Ready(Err(_)) => this.client_closed = true,
            _ => {}
        }
        polled
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Guarded<Io> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}
