//! API errors: every failure leaves as `{"error": "...", "code": N}` with its HTTP status.

use crate::types::ErrorBody;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The process could not be executed: the exit code a shell reports for it
    /// (127 command not found, 126 not executable).
    pub exec_exit: Option<i32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            exec_exit: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, message)
    }
    /// An error another daemon answered with (a guest agent), passed on as it came.
    pub fn from_status(code: u16, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
            message,
        )
    }
    /// The command cannot be executed; `code` is 127 (missing) or 126 (not executable).
    pub fn cannot_exec(code: i32, message: impl Into<String>) -> Self {
        ApiError {
            exec_exit: Some(code),
            ..Self::bad_request(message)
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(format!("{e:#}"))
    }
}

impl From<ltv_containers::image::Error> for ApiError {
    fn from(e: ltv_containers::image::Error) -> Self {
        use ltv_containers::image::Error as E;
        match e {
            E::Invalid(_) => ApiError::bad_request(e.to_string()),
            E::NotFound(_) => ApiError::not_found(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            code: self.status.as_u16(),
        };
        (self.status, Json(body)).into_response()
    }
}
