//! Keeps passwords out of everything we print.

use url::Url;

/// Parses a `postgres://` URL; the error never repeats the URL (it may hold a password).
pub fn parse_database_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("database URL is not valid ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "database URL must start with postgres:// or postgresql://, not {}://",
            url.scheme()
        ));
    }
    Ok(url)
}

/// The URL with any password replaced by `***`, for logs and status output.
pub fn redacted(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        "***".to_string()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "<unparseable database URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_replaced() {
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redacted("postgres://db/x?password=s3cret&sslmode=disable"),
            "postgres://db/x?password=***&sslmode=disable"
        );
        assert_eq!(redacted("not a url s3cret"), "<unparseable database URL>");
    }

    #[test]
    fn parse_errors_do_not_echo_the_url() {
        let err = parse_database_url("mysql://u:s3cret@h/db").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
