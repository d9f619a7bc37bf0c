//! A small HTTP/1.1 client for the daemon's API over its Unix socket (or a
//! TCP address with the bearer token): what the CLI, the tests and the
//! benchmark use. reqwest cannot speak over Unix sockets; this is hyper's
//! connection API on a `UnixStream`, one connection kept and reused.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::Mutex;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    Tcp { addr: SocketAddr, token: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp { addr, .. } => write!(f, "http://{addr}"),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(
        "cannot reach nightshift at {target}: {message} (is `nightshift serve` running with this config?)"
    )]
    Connect { target: String, message: String },
    #[error("talking to nightshift at {target}: {message}")]
    Transport { target: String, message: String },
    /// The API answered with an error (OpenAI's shape).
    #[error("{status}: {message}")]
    Api {
        status: StatusCode,
        message: String,
        code: Option<String>,
        param: Option<String>,
        body: Value,
    },
}

/// A client of one daemon.
pub struct Client {
    target: Target,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Client {
    pub fn new(target: Target) -> Client {
        Client {
            target,
            conn: Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let err = |e: std::io::Error| CallError::Connect {
            target: self.target.to_string(),
            message: e.to_string(),
        };
        let handshake_err = |e: hyper::Error| CallError::Transport {
            target: self.target.to_string(),
            message: e.to_string(),
        };
        async fn http1<S>(stream: S) -> hyper::Result<SendRequest<Full<Bytes>>>
        where
            S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            Ok(sender)
        }
        match &self.target {
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(err)?;
                http1(stream).await.map_err(handshake_err)
            }
            Target::Tcp { addr, .. } => {
                let stream = tokio::net::TcpStream::connect(addr).await.map_err(err)?;
                let _ = stream.set_nodelay(true);
                http1(stream).await.map_err(handshake_err)
            }
        }
    }

    /// Sends a request and returns the status and the whole body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Result<(StatusCode, Bytes), CallError> {
        let body: Bytes = body.into();
        let transport = |e: hyper::Error| CallError::Transport {
            target: self.target.to_string(),
            message: e.to_string(),
        };
        let mut guard = self.conn.lock().await;
        // A kept connection the server closed meanwhile is replaced once.
        for attempt in 0..2 {
            let mut sender = match guard.take() {
                Some(s) if !s.is_closed() => s,
                _ => self.connect().await?,
            };
            if sender.ready().await.is_err() {
                continue;
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(header::HOST, "nightshift");
            if let Some(ct) = content_type {
                req = req.header(header::CONTENT_TYPE, ct);
            }
            if let Target::Tcp { token, .. } = &self.target {
                req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let req = req
                .body(Full::new(body.clone()))
                .expect("a request from valid parts");
            let response = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) if attempt == 0 && e.is_canceled() => continue,
                Err(e) => return Err(transport(e)),
            };
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(transport)?
                .to_bytes();
            *guard = Some(sender);
            return Ok((status, bytes));
        }
        Err(CallError::Transport {
            target: self.target.to_string(),
            message: "the connection closed twice".into(),
        })
    }

    /// Sends a request and parses a JSON answer; an error status becomes
    /// [`CallError::Api`].
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Result<Value, CallError> {
        let (status, bytes) = self.send(method, path, content_type, body).await?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() {
            return Ok(value);
        }
        let e = &value["error"];
        Err(CallError::Api {
            status,
            message: e["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned),
            code: e["code"].as_str().map(str::to_owned),
            param: e["param"].as_str().map(str::to_owned),
            body: value.clone(),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, CallError> {
        self.json(Method::GET, path, None, Bytes::new()).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, CallError> {
        self.json(
            Method::POST,
            path,
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
        .await
    }
}
