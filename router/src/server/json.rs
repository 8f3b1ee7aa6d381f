//! The JSON body extractor of every route. axum's own answers bad JSON with a plain-text 400;
//! clients of an API whose every other error is `{"error", "error_type"}` JSON deserve the same
//! shape, with 422 and a message that names the offending field.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::ErrorResponse;

pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                    let body = ErrorResponse {
                        error: rejection.body_text(),
                        error_type: "validation".into(),
                    };
                    (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
                }
                // Missing content type (415) and bodies over the payload limit (413) keep their codes.
                other => {
                    let status = other.status();
                    (
                        status,
                        Json(ErrorResponse {
                            error: other.body_text(),
                            error_type: "request".into(),
                        }),
                    )
                        .into_response()
                }
            }),
        }
    }
}
