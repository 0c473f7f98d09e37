//! Why a request did not succeed.

use std::time::Duration;

/// The outcome of a request that did not succeed, as the caller branches on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401/403: the token is missing, wrong or not allowed.
    #[error("Wazzup refused the account's token (HTTP {status})")]
    Unauthorized { status: u16 },
    /// A 4xx answer about the records: not worth retrying unchanged.
    #[error("Wazzup rejected the request (HTTP {status} {code}: {description})")]
    Rejected {
        status: u16,
        code: String,
        description: String,
        /// Positions of the offending records, when the body names them.
        indexes: Vec<usize>,
    },
    /// Worth retrying: 429, 5xx, timeouts, broken connections, undecodable bodies.
    #[error("transient failure: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl ApiError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ApiError::Transient { .. })
    }

    /// True for a rejection with this code, compared without case and underscores.
    pub fn code_is(&self, code: &str) -> bool {
        match self {
            ApiError::Rejected { code: c, .. } => fold_code(c) == fold_code(code),
            _ => false,
        }
    }

    /// The label requests are counted under: `ok` is not an error; a status, `429` or
    /// `transient` otherwise.
    pub fn status_label(&self) -> String {
        match self {
            ApiError::Unauthorized { status } | ApiError::Rejected { status, .. } => {
                status.to_string()
            }
            ApiError::Transient { reason, .. } if reason.starts_with("HTTP 429") => "429".into(),
            ApiError::Transient { .. } => "transient".into(),
        }
    }
}

/// Folds an error code so that `USER_ALREADY_EXISTS` equals `userAlreadyExists`.
pub fn fold_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}
