//! The shipper's HTTP/1 client: one kept-alive connection to a plain
//! `http://` collector, each request bounded. Apart from the exporter
//! ([`super`]) so that buffering and loss counting read without the wire;
//! a child of it so that anything logged here stays under the exporter's
//! target, which is never shipped.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::ShipError;

/// Bound on connecting and on each request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The collector, from its URL.
#[derive(Debug)]
pub(super) struct Endpoint {
    authority: String,
    path: Uri,
}

impl Endpoint {
    /// `None` unless `url` is a plain `http://` URL with a host.
    pub(super) fn parse(url: &str) -> Option<Endpoint> {
        let uri: Uri = url.trim().parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let host = uri.host()?;
        let authority = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).parse().ok()?;
        Some(Endpoint { authority, path })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ShipError> {
        let failed = |e: &dyn std::fmt::Display| ShipError::Connect(self.authority.clone(), e.to_string());
        let stream = tokio::net::TcpStream::connect(&self.authority).await.map_err(|e| failed(&e))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| failed(&e))?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// The connection kept between requests, if one is open.
#[derive(Default)]
pub(super) struct Client {
    connection: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// Drops the kept connection: the next request opens a new one.
    pub(super) fn close(&mut self) {
        self.connection = None;
    }

    /// POSTs one JSON `body` to `endpoint` within [`REQUEST_TIMEOUT`].
    pub(super) async fn post(&mut self, endpoint: &Endpoint, body: Vec<u8>) -> Result<StatusCode, ShipError> {
        let exchange = async {
            // A kept connection the collector has closed is replaced.
            let reusable = match self.connection.as_mut() {
                Some(connection) => connection.ready().await.is_ok(),
                None => false,
            };
            let connection = match self.connection.as_mut() {
                Some(connection) if reusable => connection,
                _ => self.connection.insert(endpoint.connect().await?),
            };
            let request = Request::post(endpoint.path.clone())
                .header(http::header::HOST, endpoint.authority.as_str())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ShipError::Send(e.to_string()))?;
            let response = connection.send_request(request).await.map_err(|e| ShipError::Send(e.to_string()))?;
            let status = response.status();
            // The answer's body is read (bounded) so the connection can be reused.
            let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024).collect().await;
            Ok(status)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| ShipError::Timeout(REQUEST_TIMEOUT))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_collectors_are_used() {
        let endpoint = Endpoint::parse("http://169.254.0.1/logs").unwrap();
        assert_eq!((endpoint.authority.as_str(), endpoint.path.to_string().as_str()), ("169.254.0.1:80", "/logs"));
        assert_eq!(Endpoint::parse("http://[::1]:30006").unwrap().authority, "[::1]:30006");
        assert!(Endpoint::parse("https://collector/logs").is_none());
        assert!(Endpoint::parse("").is_none());
    }
}
