//! HTTPS for the server: the certificate and key from PEM files, and a listener that runs TLS
//! handshakes side by side, so a slow or silent client cannot hold up the accept loop.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its handshake before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past that, new connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 512;

/// The server's TLS settings, loaded and checked at start-up.
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl Tls {
    /// Reads a PEM certificate chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or
    /// SEC1). Errors name the file and what is wrong with it.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, String> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "--tls-cert {}: no PEM certificate in the file",
                cert.display()
            ));
        }
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                format!(
                    "--tls-cert {} and --tls-key {} do not make a usable pair: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
        // The server speaks HTTP/1.1 only; saying so lets clients skip an h2 attempt.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn listener<L: Listener>(self, inner: L) -> TlsListener<L> {
        TlsListener {
            inner,
            acceptor: self.acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

/// The crypto provider, named rather than taken from a process-wide default: the binary
/// carries ring only.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts TCP connections from `inner` and yields them once their handshake is done. A failed
/// or timed-out handshake (a plain-HTTP client, a scanner, a client that does not trust the
/// certificate) closes that connection and nothing else.
pub struct TlsListener<L: Listener> {
    inner: L,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Handshake<L>>,
}

/// A finished handshake's connection; `None` when it failed.
type Handshake<L> = Option<(TlsStream<<L as Listener>::Io>, <L as Listener>::Addr)>;

impl<L> Listener for TlsListener<L>
where
    L: Listener,
    L::Addr: std::fmt::Debug + 'static,
{
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < MAX_HANDSHAKES;
            tokio::select! {
                // Both branches are cancel-safe: an accepted connection is handed to the set
                // before the next await.
                (io, addr) = self.inner.accept(), if room => {
                    let acceptor = self.acceptor.clone();
                    self.handshakes.spawn(handshake(acceptor, io, addr));
                }
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

async fn handshake<Io, A>(acceptor: TlsAcceptor, io: Io, addr: A) -> Option<(TlsStream<Io>, A)>
where
    Io: AsyncRead + AsyncWrite + Unpin,
    A: std::fmt::Debug,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => Some((stream, addr)),
        // Debug level: anyone can cause these, and they say nothing about the server.
        Ok(Err(e)) => {
            tracing::debug!(peer = ?addr, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(peer = ?addr, "TLS handshake timed out");
            None
        }
    }
}
