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

/// Fields that hold a JSON object must be given one. serde's derived structs also take an array
/// (`"parameters": [null, null]` as the first fields in order), which the API documents nowhere;
/// these `deserialize_with` helpers refuse it, and keep the inner field's path in the message.
pub fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::de::Error;
    use serde::Deserialize;
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    serde_path_to_error::deserialize(serde_json::Value::Object(map))
        .map_err(|e| D::Error::custom(format!("{}: {}", e.path(), e.inner())))
}

pub fn optional_object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::Deserialize;
    match Option::<serde_json::Value>::deserialize(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => object(v).map(Some).map_err(serde::de::Error::custom),
    }
}

pub fn objects<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::Deserialize;
    Vec::<serde_json::Value>::deserialize(d)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| object(v).map_err(|e| serde::de::Error::custom(format!("[{i}].{e}"))))
        .collect()
}

/// An optional array of objects, kept as JSON (OpenAI's `tools`).
pub fn optional_objects<'de, D>(d: D) -> Result<Option<serde_json::Value>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    let list = Option::<Vec<serde_json::Map<String, serde_json::Value>>>::deserialize(d)?;
    Ok(list
        .map(|l| serde_json::Value::Array(l.into_iter().map(serde_json::Value::Object).collect())))
}
