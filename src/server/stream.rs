//! Server streams with keep-alives: a keep-alive message goes out whenever
//! `Keepalive-Ping-Interval` seconds pass without another message.

use std::time::{Duration, Instant};

use connectrpc::{ConnectError, ServiceStream};
use futures_util::Stream;
use futures_util::StreamExt;
use http::HeaderMap;

use super::errors::RpcError;

/// Used when the header is missing, not an integer, or not positive.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// The keep-alive interval a request asked for.
pub fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|seconds| *seconds > 0)
        .map_or(DEFAULT_KEEPALIVE, |seconds| Duration::from_secs(seconds.unsigned_abs()))
}

/// Emits `first`, then the items of `events`, inserting `keepalive()`
/// whenever `interval` passes in silence; ends when `events` ends.
pub fn with_keepalive<T, S>(first: T, events: S, interval: Duration, keepalive: fn() -> T) -> ServiceStream<T>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + Unpin + 'static,
{
    let rest = futures_util::stream::unfold(events, move |mut events| async move {
        match tokio::time::timeout(interval, events.next()).await {
            Ok(Some(item)) => Some((Ok(item), events)),
            Ok(None) => None,
            Err(_silence) => Some((Ok(keepalive()), events)),
        }
    });
    Box::pin(futures_util::stream::once(async move { Ok::<T, ConnectError>(first) }).chain(rest))
}

/// Ends `stream` with `deadline_exceeded` when `Connect-Timeout-Ms` passes
/// (the Connect library bounds only unary calls). An item that arrives
/// after the deadline is replaced by the error too.
pub fn until_deadline<T: Send + 'static>(stream: ServiceStream<T>, deadline: Option<Instant>) -> ServiceStream<T> {
    let Some(deadline) = deadline else { return stream };
    let expiry = Box::pin(tokio::time::sleep_until(deadline.into()));
    let exceeded = || ConnectError::from(RpcError::DeadlineExceeded);
    Box::pin(futures_util::stream::unfold(Some((stream, expiry)), move |state| async move {
        let (mut stream, mut expiry) = state?;
        tokio::select! {
            biased;
            () = &mut expiry => Some((Err(exceeded()), None)),
            item = stream.next() => match item {
                Some(_) if Instant::now() >= deadline => Some((Err(exceeded()), None)),
                Some(item) => Some((item, Some((stream, expiry)))),
                None => None,
            },
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_a_silent_stream() {
        let silent: ServiceStream<i32> = Box::pin(futures_util::stream::pending());
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut stream = until_deadline(silent, Some(deadline));
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code, connectrpc::ErrorCode::DeadlineExceeded);
        assert!(stream.next().await.is_none());
    }

    #[test]
    fn interval_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(keepalive_interval(&headers), DEFAULT_KEEPALIVE);
        for (value, expected) in [("50", 50), ("0", 90), ("-3", 90), ("abc", 90)] {
            headers.insert("keepalive-ping-interval", value.parse().unwrap());
            assert_eq!(keepalive_interval(&headers), Duration::from_secs(expected), "{value}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_fill_silence() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let events = tokio_stream_from(rx);
        let mut stream = with_keepalive(0, events, Duration::from_secs(5), || -1);
        assert_eq!(stream.next().await.unwrap().unwrap(), 0);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(stream.next().await.unwrap().unwrap(), -1);
        tx.send(7).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 7);
        drop(tx);
        assert!(stream.next().await.is_none());
    }

    fn tokio_stream_from(rx: tokio::sync::mpsc::Receiver<i32>) -> impl Stream<Item = i32> + Unpin {
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }))
    }
}
