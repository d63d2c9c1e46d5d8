//! The bearer token clients send: `authorization: Bearer <token>` on every
//! call, or nothing when no token is configured.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// A token that cannot travel in an HTTP header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token holds characters that cannot be sent in a header")]
pub struct InvalidToken;

/// Client interceptor adding the bearer token, if any.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// A missing or empty token sends no header.
    pub fn new(token: Option<&str>) -> Result<Bearer, InvalidToken> {
        match token.filter(|t| !t.is_empty()) {
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| InvalidToken),
            None => Ok(Bearer(None)),
        }
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_header_only_with_a_token() {
        let mut with = Bearer::new(Some("s3cret")).expect("ascii");
        let request = with.call(tonic::Request::new(())).expect("ok");
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        for none in [None, Some("")] {
            let mut without = Bearer::new(none).expect("ok");
            let request = without.call(tonic::Request::new(())).expect("ok");
            assert!(request.metadata().get("authorization").is_none());
        }
        assert_eq!(Bearer::new(Some("line\nbreak")).err(), Some(InvalidToken));
    }
}

/// Why a request's `authorization` header does not carry the expected token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    /// No `Bearer` token at all.
    Missing,
    /// A token, but not the expected one.
    Wrong,
}

/// Checks an `authorization` header value (`Bearer <token>`) against
/// `expected`, in time that does not depend on where they differ.
pub fn check_bearer(header: Option<&str>, expected: &str) -> Result<(), TokenProblem> {
    match header.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(TokenProblem::Wrong),
        None => Err(TokenProblem::Missing),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod bearer_tests {
    use super::*;

    #[test]
    fn only_the_expected_bearer_token_passes() {
        assert_eq!(check_bearer(Some("Bearer s3cret"), "s3cret"), Ok(()));
        assert_eq!(
            check_bearer(Some("Bearer s3cre"), "s3cret"),
            Err(TokenProblem::Wrong)
        );
        assert_eq!(
            check_bearer(Some("Bearer "), "s3cret"),
            Err(TokenProblem::Wrong)
        );
        assert_eq!(
            check_bearer(Some("s3cret"), "s3cret"),
            Err(TokenProblem::Missing)
        );
        assert_eq!(check_bearer(None, "s3cret"), Err(TokenProblem::Missing));
    }
}
