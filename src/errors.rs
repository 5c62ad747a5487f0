//! Turning refusals into PostgreSQL errors with a fitting SQLSTATE.

use outbox_core::validate::Refusal;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raises `ERROR` with the given SQLSTATE; never returns.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "webhook_outbox").report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Raises the refusal as `ERROR`: 22023 for a value that is not allowed, 22P02 for one that
/// does not parse, 54000 for one over a limit.
pub fn refuse(refusal: Refusal) -> ! {
    let code = match &refusal {
        Refusal::Invalid(_) => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        Refusal::Malformed(_) => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        Refusal::TooLarge(_) => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
    };
    raise(code, refusal.message())
}

/// Unwraps a validation result or raises it.
pub trait OrRefuse<T> {
    fn or_refuse(self) -> T;
}

impl<T, E: Into<Refusal>> OrRefuse<T> for Result<T, E> {
    fn or_refuse(self) -> T {
        self.unwrap_or_else(|r| refuse(r.into()))
    }
}
