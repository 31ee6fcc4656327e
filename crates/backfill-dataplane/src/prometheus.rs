//! The Prometheus query signal: one PromQL expression read from a Prometheus server's
//! `/api/v1/query` every probe interval, its value judged like the throttle query's.
//!
//! The request is a GET with reqwest (http or https, bounded by `throttle.probe_timeout`);
//! the answer's body is read up to [`MAX_ANSWER_BYTES`].

use std::time::Duration;

use backfill_core::throttle::QueryReading;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

/// Answers larger than this are refused: an instant query for a threshold is a few
/// hundred bytes, and a runaway expression must not eat the daemon's memory.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;

/// A PromQL expression and the server that evaluates it.
#[derive(Debug, Clone)]
pub struct PrometheusQuery {
    client: reqwest::Client,
    /// `/api/v1/query` with the expression, on the server's URL.
    url: reqwest::Url,
    /// The URL without credentials, for messages.
    shown: String,
    timeout: Duration,
}

impl PrometheusQuery {
    /// A query of `expr` on the server at `url` (`http://host:port[/prefix]`), each given up
    /// after `timeout`; an error names what is wrong with the URL.
    pub fn new(url: &str, expr: &str, timeout: Duration) -> Result<Self, String> {
        let parsed = url::Url::parse(url)
            .map_err(|e| format!("{url:?} is not a URL like http://prometheus:9090 ({e})"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "{url:?}: only http:// and https:// are supported (scheme {:?})",
                parsed.scheme()
            ));
        }
        let host = parsed
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| format!("{url:?} names no host"))?;
        let prefix = parsed.path().trim_end_matches('/');
        let shown = match parsed.port() {
            Some(port) => format!("{}://{host}:{port}{prefix}", parsed.scheme()),
            None => format!("{}://{host}{prefix}", parsed.scheme()),
        };
        let mut query_url = parsed.clone();
        query_url.set_path(&format!("{prefix}/api/v1/query"));
        query_url.set_query(Some(&format!(
            "query={}",
            utf8_percent_encode(expr, NON_ALPHANUMERIC)
        )));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("backfilld/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("{shown}: cannot build an HTTP client ({e})"))?;
        Ok(PrometheusQuery {
            client,
            url: query_url,
            shown,
            timeout,
        })
    }

    /// The expression's value now, or why there is none.
    pub async fn read(&self) -> QueryReading {
        match tokio::time::timeout(self.timeout, self.fetch()).await {
            Ok(Ok((status, body))) => match answer_value(status, &body) {
                Ok(value) => QueryReading::Value(value),
                Err(e) => QueryReading::Failed(format!("Prometheus at {}: {e}", self.shown)),
            },
            Ok(Err(e)) => QueryReading::Failed(format!("Prometheus at {}: {e}", self.shown)),
            Err(_) => QueryReading::Failed(format!(
                "Prometheus at {}: no answer within throttle.probe_timeout ({:?})",
                self.shown, self.timeout
            )),
        }
    }

    async fn fetch(&self) -> Result<(u16, String), String> {
        // Errors without the URL: it may carry credentials, and `shown` names the server.
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("sending the query: {}", e.without_url()))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the answer: {}", e.without_url()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > MAX_ANSWER_BYTES {
                return Err(format!("an answer over {MAX_ANSWER_BYTES} bytes"));
            }
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// The value of an `/api/v1/query` answer: a scalar, or the largest sample of a vector
/// (the worst of several series); an empty vector, an error or anything else is no value.
fn answer_value(status: u16, body: &str) -> Result<f64, String> {
    let answer: Value = serde_json::from_str(body)
        .map_err(|_| format!("HTTP {status}, not a Prometheus API answer"))?;
    if answer["status"] != "success" {
        return Err(format!(
            "HTTP {status}, {}: {}",
            answer["errorType"].as_str().unwrap_or("error"),
            answer["error"].as_str().unwrap_or("no message")
        ));
    }
    let data = &answer["data"];
    let sample_value = |sample: &Value| -> Result<f64, String> {
        let text = sample[1].as_str().ok_or("a sample without a value")?;
        text.parse::<f64>()
            .ok()
            .filter(|value| !value.is_nan())
            .ok_or_else(|| format!("the value {text:?} is not a number"))
    };
    match data["resultType"].as_str() {
        Some("scalar") => sample_value(&data["result"]),
        Some("vector") => {
            let series = data["result"].as_array().ok_or("a vector without series")?;
            let mut values = series.iter().map(|s| sample_value(&s["value"]));
            let first = values.next().ok_or(
                "the query returned no series; wrap it in (… ) or vector(0) if no data means fine",
            )??;
            values.try_fold(first, |most, value| Ok(most.max(value?)))
        }
        other => Err(format!(
            "the query returned a {}; it must return a scalar or an instant vector",
            other.unwrap_or("nothing")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_the_query_encoded() {
        let query = PrometheusQuery::new(
            "http://prom.monitoring:9090/prefix/",
            "max(x{a=\"b\"}) > 1",
            Duration::from_secs(1),
        )
        .expect("a valid URL");
        assert_eq!(
            query.url.as_str(),
            "http://prom.monitoring:9090/prefix/api/v1/query?query=max%28x%7Ba%3D%22b%22%7D%29%20%3E%201"
        );
        assert_eq!(query.shown, "http://prom.monitoring:9090/prefix");
        // Credentials in the URL are used, never shown.
        let secret = PrometheusQuery::new("https://u:pw@prom/", "up", Duration::from_secs(1))
            .expect("https with credentials");
        assert_eq!(secret.shown, "https://prom");
        for (url, mentions) in [
            ("ftp://prom:9090", "only http:// and https:// are supported"),
            ("prom:9090", "only http:// and https:// are supported"),
            ("not a url", "is not a URL"),
        ] {
            let error = PrometheusQuery::new(url, "up", Duration::from_secs(1)).expect_err(url);
            assert!(error.contains(mentions), "{url}: {error}");
        }
    }

    #[test]
    fn answers_give_a_scalar_or_the_largest_sample() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"a":"1"},"value":[1700000000.1,"0.25"]},
            {"metric":{"a":"2"},"value":[1700000000.1,"3"]}]}}"#;
        assert_eq!(answer_value(200, vector), Ok(3.0));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"7"]}}"#;
        assert_eq!(answer_value(200, scalar), Ok(7.0));
        for (status, body, mentions) in [
            (
                200,
                r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
                "no series",
            ),
            (
                400,
                r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
                "bad_data: parse error",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
                "returned a matrix",
            ),
            (
                200,
                r#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#,
                "not a number",
            ),
            (502, "<html>bad gateway</html>", "HTTP 502"),
        ] {
            let error = answer_value(status, body).expect_err(mentions);
            assert!(error.contains(mentions), "{error}");
        }
    }
}
