//! One line for a person: an error and its causes, each said once.

use std::error::Error as StdError;

use crate::pg::error::pg_error_text;

/// An error and its chain of causes (`source()`), joined with ": ", as shown on the
/// command line, in HTTP error messages and in logs.
///
/// A `tokio_postgres::Error` is spelled out with the server's message, SQLSTATE, detail
/// and hint (its own text is just "db error"); a cause whose text is already in the line
/// (some libraries print their cause themselves) is not repeated.
pub fn report(error: &(dyn StdError + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let postgres = e.downcast_ref::<tokio_postgres::Error>();
        let text = match postgres {
            Some(pg) => pg_error_text(pg),
            None => e.to_string(),
        };
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        // pg_error_text has already said what lies below a Postgres error.
        next = if postgres.is_some() { None } else { e.source() };
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the keys file k.toml")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("serving")]
    struct Top(#[source] Outer);

    #[test]
    fn each_cause_once_in_order() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            report(&Top(Outer(io))),
            "serving: cannot read the keys file k.toml: no such file"
        );
    }

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper: inner text")]
        struct Pastes(#[source] std::io::Error);
        let io = std::io::Error::other("inner text");
        assert_eq!(report(&Pastes(io)), "wrapper: inner text");
    }

    #[test]
    fn anyhow_chains_report_the_same_way() {
        let io = std::io::Error::other("refused");
        let e = anyhow::Error::new(io).context("cannot listen on 127.0.0.1:1");
        assert_eq!(report(e.as_ref()), "cannot listen on 127.0.0.1:1: refused");
    }
}
