//! The facade's HTTP/1.1 server: axum's router on hyper, with a bound on how long a client may
//! take to send a request's head (so a client trickling a head cannot hold a connection), and
//! a graceful stop in which requests in flight finish.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a stop waits for requests in flight before it drops their connections.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait a moment instead of spinning.
                tracing::warn!(%error, "The REST API could not accept a connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "A REST API connection ended with an error.");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("Requests still in flight when the REST API stopped were cut off.");
    }
}
