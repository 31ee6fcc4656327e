//! Text log lines that a value cannot forge: control characters in event and span
//! fields are written escaped (`\n`, `\r`, `\u{1b}`…), so a job name holding a line
//! break cannot start a line of its own, nor an escape sequence drive the terminal.
//! (The JSON format escapes them already.)

use std::borrow::Cow;
use std::error::Error;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// Formats fields as tracing-subscriber's [`DefaultFields`] does, with every control
/// character in their values escaped.
#[derive(Debug, Default)]
pub struct EscapedFields(DefaultFields);

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = Escaping<<DefaultFields as MakeVisitor<Writer<'a>>>::Visitor>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        Escaping(self.0.make_visitor(target))
    }
}

/// A field visitor that hands `V` escaped values.
#[derive(Debug)]
pub struct Escaping<V>(V);

impl<V: Visit> Visit for Escaping<V> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // The message is written as it is; other strings are quoted with `Debug`, which
        // escapes them already.
        if field.name() == "message" {
            self.0.record_str(field, &escape_controls(value));
        } else {
            self.0.record_str(field, value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn Error + 'static)) {
        self.0.record_error(field, &EscapedError::new(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, &Escaped(value));
    }
}

impl<V: VisitOutput<fmt::Result>> VisitOutput<fmt::Result> for Escaping<V> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl<V: VisitFmt> VisitFmt for Escaping<V> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// Whether `c` may not appear as it is in a log line: C0 and C1 controls (line breaks,
/// ESC, BEL…), DEL, and the Unicode line and paragraph separators.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `text` with every control character written as Rust escapes it (`\n`, `\u{1b}`).
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.contains(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    let _ = EscapingWriter(&mut escaped).write_str(text);
    Cow::Owned(escaped)
}

/// Writes through to `W`, escaping control characters.
struct EscapingWriter<W>(W);

impl<W: fmt::Write> fmt::Write for EscapingWriter<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(is_unsafe) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            write!(self.0, "{}", c.escape_debug())?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// A value whose `Debug` output is escaped.
struct Escaped<'a>(&'a dyn fmt::Debug);

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapingWriter(f), "{:?}", self.0)
    }
}

/// An error chain with its messages escaped, so the formatter still lists the sources.
#[derive(Debug)]
struct EscapedError {
    message: String,
    source: Option<Box<EscapedError>>,
}

impl EscapedError {
    fn new(error: &dyn Error) -> Self {
        EscapedError {
            message: escape_controls(&error.to_string()).into_owned(),
            source: error
                .source()
                .map(|source| Box::new(EscapedError::new(source))),
        }
    }
}

impl fmt::Display for EscapedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for EscapedError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|source| source as _)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    #[test]
    fn controls_are_escaped_and_the_rest_kept() {
        assert_eq!(escape_controls("plain \"text\" é"), "plain \"text\" é");
        assert_eq!(
            escape_controls("a\nb\r\x1b[2J\x07\u{85}\u{2028}\t"),
            r"a\nb\r\u{1b}[2J\u{7}\u{85}\u{2028}\t"
        );
    }

    /// What one event and its span write in the text format with [`EscapedFields`].
    fn text_log(emit: impl FnOnce()) -> String {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(Arc::clone(&sink)))
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields::default())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8(bytes).expect("UTF-8 log")
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut buffer = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            buffer.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_field_can_start_a_line_or_send_an_escape_sequence() {
        let evil = "x\nINFO forged\r\x1b[31m";
        let error = std::io::Error::other(format!("outer {evil}"));
        let log = text_log(|| {
            let span = tracing::info_span!("job", job = %evil, debug = ?evil, plain = evil);
            let _entered = span.enter();
            tracing::info!(error = &error as &dyn Error, shown = %evil, "message {evil}");
            tracing::info!("{evil}");
        });
        assert_eq!(log.lines().count(), 2, "{log}");
        for line in log.lines() {
            assert!(!line.contains(is_unsafe), "{line:?}");
        }
        let escaped = r"x\nINFO forged\r\u{1b}[31m";
        assert_eq!(
            log.lines().next().unwrap_or_default(),
            format!(
                " INFO job{{job={escaped} debug=\"{escaped}\" plain=\"{escaped}\"}}: backfilld::log_escape::tests: message {escaped} error=outer {escaped} shown={escaped}"
            )
        );
    }
}
