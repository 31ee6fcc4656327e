//! The events webhook: every `backfill_events` payload POSTed as JSON to
//! `events.webhook_url`, retried with backoff, each attempt bounded by
//! `events.webhook_timeout`.
//!
//! It never touches a batch: one task LISTENs and puts payloads on a bounded queue (a full
//! queue drops the event and counts it), another posts them. One worker at a time sends
//! (it holds an advisory lock on its listening session), so pods running side by side do
//! not post each event once each; when that worker goes, its session and lock go with it
//! and another takes over. The URL is a secret (a Slack webhook's path is its key): it is
//! never logged.
//!
//! The POST is reqwest's (http or https on the binary's rustls stack); its errors are
//! logged without the URL.

use std::time::Duration;

use metrics::counter;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::settings::EventSettings;

/// The advisory lock whose holder sends the webhook (`hashtext('backfilld.webhook')` is
/// not stable across PostgreSQL versions; a constant is).
const SENDER_LOCK: i64 = 0x6266_6c64_7768_6b00; // "bfldwhk\0"

/// How long a listener that lost (or never got) the sender lock waits before trying again.
const RETRY_LOCK_EVERY: Duration = Duration::from_secs(5);

/// On the way out, events still arriving are taken until none came for this long.
const FINAL_QUIET: Duration = Duration::from_millis(500);

/// Checks a webhook URL: http or https with a host. Says what is wrong without quoting
/// the URL (it is a secret).
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http:// or https:// URL, got scheme {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_string());
    }
    Ok(())
}

/// The running webhook.
pub struct Webhook {
    stop: watch::Sender<bool>,
    listener: tokio::task::JoinHandle<()>,
    sender: tokio::task::JoinHandle<()>,
}

/// Starts the webhook when `events.webhook_url` is set.
pub fn spawn(settings: &EventSettings, pool: PgPool) -> Option<Webhook> {
    if settings.webhook_url.is_empty() {
        return None;
    }
    let url = url::Url::parse(&settings.webhook_url).ok()?;
    let client = match reqwest::Client::builder()
        .timeout(settings.webhook_timeout)
        .user_agent(concat!("backfilld/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            warn!(error = %e.without_url(), "events webhook off: cannot set up its HTTP client");
            return None;
        }
    };
    describe_metrics();
    let (queue, pending) = mpsc::channel(settings.webhook_queue);
    let (stop, stopping) = watch::channel(false);
    let listener = tokio::spawn(listen(pool, queue, stopping));
    let sender = tokio::spawn(send_all(
        pending,
        Target {
            url,
            timeout: settings.webhook_timeout,
            attempts: settings.webhook_attempts,
            client,
        },
    ));
    info!(
        timeout = ?settings.webhook_timeout,
        "events webhook on (the URL is not logged)"
    );
    Some(Webhook {
        stop,
        listener,
        sender,
    })
}

impl Webhook {
    /// Stops listening, taking the events still arriving, and gives the sender up to
    /// `bound` to post what it has: a run-to-completion worker's last events (the job
    /// that succeeded) still go out.
    pub async fn finish(self, bound: Duration) {
        self.stop.send_replace(true);
        let _ = self.listener.await;
        let mut sender = self.sender;
        if tokio::time::timeout(bound, &mut sender).await.is_err() {
            warn!(?bound, "events webhook: gave up on events not yet posted");
            sender.abort();
        }
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "backfill_webhook_events_total",
        "Events for the webhook by outcome: sent, failed (every attempt failed), dropped (queue full)."
    );
    for outcome in ["sent", "failed", "dropped"] {
        counter!("backfill_webhook_events_total", "outcome" => outcome).increment(0);
    }
}

/// Listens for events while this worker holds the sender lock; tries for the lock again
/// whenever it does not, or loses its session.
async fn listen(pool: PgPool, queue: mpsc::Sender<String>, mut stopping: watch::Receiver<bool>) {
    let mut listener: Option<PgListener> = None;
    loop {
        if *stopping.borrow() {
            break;
        }
        let Some(session) = listener.as_mut() else {
            match hold_sender_lock(&pool).await {
                Ok(Some(session)) => {
                    info!("events webhook: this worker sends the events");
                    listener = Some(session);
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "events webhook: cannot listen for events; retrying"),
            }
            if listener.is_none() {
                tokio::select! {
                    () = tokio::time::sleep(RETRY_LOCK_EVERY) => {}
                    _ = stopping.changed() => {}
                }
            }
            continue;
        };
        tokio::select! {
            _ = stopping.changed() => {}
            received = session.try_recv() => match received {
                Ok(Some(event)) => enqueue(&queue, event.payload()),
                // The session was lost, and the lock with it: start over.
                Ok(None) | Err(_) => {
                    warn!("events webhook: the listening session was lost; events meanwhile are not posted");
                    listener = None;
                }
            },
        }
    }
    // Events of changes that committed just before the stop are still on their way.
    if let Some(session) = listener.as_mut() {
        while let Ok(Ok(Some(event))) = tokio::time::timeout(FINAL_QUIET, session.try_recv()).await
        {
            enqueue(&queue, event.payload());
        }
    }
}

/// A listening session that holds the sender lock, or `None` when another worker has it.
async fn hold_sender_lock(pool: &PgPool) -> Result<Option<PgListener>, sqlx::Error> {
    let mut session = PgListener::connect_with(pool).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SENDER_LOCK)
        .fetch_one(&mut session)
        .await?;
    if !locked {
        return Ok(None);
    }
    session.listen(backfill_queue::EVENTS_CHANNEL).await?;
    Ok(Some(session))
}

/// Queues one payload, or drops and counts it when the webhook is that far behind.
fn enqueue(queue: &mpsc::Sender<String>, payload: &str) {
    if queue.try_send(payload.to_string()).is_err() {
        counter!("backfill_webhook_events_total", "outcome" => "dropped").increment(1);
        warn!("events webhook: queue full (events.webhook_queue); event dropped");
    }
}

/// Where and how events are posted.
struct Target {
    url: url::Url,
    timeout: Duration,
    attempts: u32,
    client: reqwest::Client,
}

/// Posts each queued event in turn, with retries.
async fn send_all(mut pending: mpsc::Receiver<String>, target: Target) {
    while let Some(payload) = pending.recv().await {
        let mut backoff = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            let outcome = tokio::time::timeout(target.timeout, post(&target, &payload)).await;
            let error = match outcome {
                Ok(Ok(())) => {
                    counter!("backfill_webhook_events_total", "outcome" => "sent").increment(1);
                    break;
                }
                Ok(Err(e)) => e,
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(target.timeout)
                ),
            };
            if attempt >= target.attempts {
                counter!("backfill_webhook_events_total", "outcome" => "failed").increment(1);
                warn!(%error, attempts = attempt, "events webhook: event not delivered; dropped");
                break;
            }
            info!(%error, attempt, retry_in = ?backoff, "events webhook: POST failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
            attempt += 1;
        }
    }
}

/// One POST of `body`; `Ok` on a 2xx answer, else an error naming the status or what
/// failed (never the URL: it is a secret).
async fn post(target: &Target, body: &str) -> Result<(), String> {
    let response = target
        .client
        .post(target.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Posts `{}` to a local peer that answers `answer` (or closes at once when it is
    /// empty); returns the outcome and the request line the peer read.
    async fn post_to(answer: &'static str) -> (Result<(), String>, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = vec![0; 4096];
            let n = stream.read(&mut request).await.expect("read");
            if !answer.is_empty() {
                stream.write_all(answer.as_bytes()).await.expect("write");
            }
            let request = String::from_utf8_lossy(&request[..n]).to_string();
            request.lines().next().unwrap_or_default().to_string()
        });
        let target = Target {
            url: url::Url::parse(&format!("http://127.0.0.1:{port}/hook?key=secret")).expect("url"),
            timeout: Duration::from_secs(5),
            attempts: 1,
            client: reqwest::Client::new(),
        };
        let outcome = post(&target, "{}").await;
        (outcome, peer.await.expect("peer"))
    }

    #[tokio::test]
    async fn a_2xx_answer_is_delivered_anything_else_is_an_error_naming_the_status() {
        let (ok, request) = post_to("HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(ok, Ok(()));
        assert_eq!(request, "POST /hook?key=secret HTTP/1.1");
        let (unavailable, _) =
            post_to("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(unavailable, Err("HTTP 503".to_string()));
        let (nothing, _) = post_to("").await;
        let error = nothing.expect_err("a peer that closes without answering");
        assert!(!error.contains("secret"), "the URL leaked: {error}");
    }

    #[test]
    fn only_http_and_https_urls_with_a_host_are_taken_and_the_url_is_not_quoted() {
        assert_eq!(
            check_url("https://hooks.example.com/services/T0/B0/secret"),
            Ok(())
        );
        assert_eq!(check_url("http://127.0.0.1:8080/events"), Ok(()));
        let ftp = check_url("ftp://example.com/secret").unwrap_err();
        assert_eq!(
            ftp,
            "must be an http:// or https:// URL, got scheme \"ftp\""
        );
        let garbage = check_url("not a url/secret").unwrap_err();
        assert!(
            garbage.starts_with("is not a URL") && !garbage.contains("secret"),
            "{garbage}"
        );
    }
}
