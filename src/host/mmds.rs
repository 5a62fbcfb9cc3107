//! Client of Firecracker's metadata service (MMDS), version 2: a session
//! token from `PUT /latest/api/token`, then `GET /` as JSON with that
//! token. Every read takes a fresh token and a fresh connection, as the
//! reference does, so a restored VM never reuses a stale session.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

pub use super::mmds_route::MMDS_ADDRESS;
use super::mmds_route::RouteHealer;

/// Path of the session-token endpoint.
const TOKEN_PATH: &str = "/latest/api/token";
/// Request header carrying the wanted token lifetime.
const TOKEN_TTL_HEADER: &str = "x-metadata-token-ttl-seconds";
/// Request header carrying the session token.
const TOKEN_HEADER: &str = "x-metadata-token";
const TOKEN_TTL_SECONDS: &str = "60";
/// Bound on one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Metadata larger than this is refused.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What envd reads from the metadata service; unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Metadata {
    /// The sandbox id.
    #[serde(rename = "instanceID", default)]
    pub instance_id: Option<String>,
    /// The template id.
    #[serde(rename = "envID", default)]
    pub env_id: Option<String>,
    /// Where the host collects logs.
    #[serde(default)]
    pub address: Option<String>,
    /// Lowercase hex SHA-512 of the access token (of "" when none).
    #[serde(rename = "accessTokenHash", default)]
    pub access_token_hash: Option<String>,
    /// The template's default user, when the host provides it.
    #[serde(rename = "defaultUser", default)]
    pub default_user: Option<String>,
    /// The template's default workdir, when the host provides it.
    #[serde(rename = "defaultWorkdir", default)]
    pub default_workdir: Option<String>,
}

/// Why a metadata read failed.
#[derive(Debug, thiserror::Error)]
pub enum MmdsError {
    /// Connecting or talking to the service failed.
    #[error("metadata service at {address}: {message}")]
    Unreachable {
        /// host:port.
        address: String,
        /// What happened.
        message: String,
    },
    /// The service answered with an unexpected status.
    #[error("metadata service answered {0}")]
    Status(StatusCode),
    /// The token endpoint returned an empty token.
    #[error("metadata service returned an empty session token")]
    EmptyToken,
    /// The metadata is not the expected JSON.
    #[error("metadata is not valid JSON: {0}")]
    BadJson(serde_json::Error),
}

/// The metadata service's JSON document, as envd reads it.
pub fn parse_metadata(body: &[u8]) -> Result<Metadata, MmdsError> {
    serde_json::from_slice(body).map_err(MmdsError::BadJson)
}

/// A metadata service client.
#[derive(Debug, Clone)]
pub struct MmdsClient {
    address: String,
    /// Pins the service's route when a read fails (the real address only).
    healer: Option<Arc<RouteHealer>>,
}

impl MmdsClient {
    /// A client of the service at `host:port`; at the VM's own metadata
    /// address it heals the route when a read fails (`mmds_route`).
    pub fn new(address: impl Into<String>) -> Self {
        let address = address.into();
        let healer = (address == MMDS_ADDRESS).then(Arc::default);
        Self { address, healer }
    }

    /// Reads the metadata; when that fails at the VM's metadata address,
    /// the route is pinned ahead of the nat rules and the read tried once
    /// more.
    pub async fn read(&self) -> Result<Metadata, MmdsError> {
        let first = self.read_once().await;
        let (Err(err), Some(healer)) = (&first, &self.healer) else { return first };
        match healer.heal().await {
            Ok(Some(pinned)) => {
                tracing::warn!(
                    stale_jumps = pinned.stale_jumps,
                    "metadata service not readable ({err}): its route is pinned ahead of every nat rule \
                     (chain ENVD-MMDS first in PREROUTING and OUTPUT), reading again"
                );
                let again = self.read_once().await;
                healer.helped(again.is_ok());
                again
            }
            // Another read healed it a moment ago.
            Ok(None) => self.read_once().await,
            Err(heal) => {
                tracing::warn!("metadata service not readable ({err}), and its route could not be pinned: {heal}");
                first
            }
        }
    }

    /// Reads the metadata once; a 401 (expired session) is retried once
    /// with a new token.
    async fn read_once(&self) -> Result<Metadata, MmdsError> {
        let mut retried = false;
        loop {
            let token = self.session_token().await?;
            let request =
                Request::get("/").header(TOKEN_HEADER, token).header(http::header::ACCEPT, "application/json");
            match self.send(request, Bytes::new()).await? {
                (StatusCode::OK, body) => return parse_metadata(&body),
                (StatusCode::UNAUTHORIZED, _) if !retried => retried = true,
                (status, _) => return Err(MmdsError::Status(status)),
            }
        }
    }

    async fn session_token(&self) -> Result<String, MmdsError> {
        let request =
            Request::builder().method(Method::PUT).uri(TOKEN_PATH).header(TOKEN_TTL_HEADER, TOKEN_TTL_SECONDS);
        match self.send(request, Bytes::new()).await? {
            (StatusCode::OK, body) => {
                let token = String::from_utf8_lossy(&body).trim().to_owned();
                if token.is_empty() { Err(MmdsError::EmptyToken) } else { Ok(token) }
            }
            (status, _) => Err(MmdsError::Status(status)),
        }
    }

    async fn send(&self, request: http::request::Builder, body: Bytes) -> Result<(StatusCode, Bytes), MmdsError> {
        let unreachable = |message: String| MmdsError::Unreachable { address: self.address.clone(), message };
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.address).await.map_err(|e| unreachable(e.to_string()))?;
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(connection);
            let request = request
                .header(http::header::HOST, self.address.as_str())
                .body(Full::new(body))
                .map_err(|e| unreachable(e.to_string()))?;
            let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
            let status = response.status();
            let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY_BYTES);
            let body = limited.collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| unreachable("timed out".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_hosts_metadata() {
        let json = br#"{"instanceID":"sbx1","envID":"tpl1","address":"http://10.0.0.1/logs","accessTokenHash":"ab","extra":{"x":1}}"#;
        let metadata: Metadata = serde_json::from_slice(json).unwrap();
        assert_eq!(metadata.instance_id.as_deref(), Some("sbx1"));
        assert_eq!(metadata.env_id.as_deref(), Some("tpl1"));
        assert_eq!(metadata.access_token_hash.as_deref(), Some("ab"));
        assert_eq!(metadata.default_user, None);
    }
}
