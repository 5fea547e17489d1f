//! What a console sends back: JSON with the right HTTP status, pages and
//! error pages, each with headers that keep the browser to this origin.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confer_protocol::{ErrorKind, ProtocolError};
use serde::Serialize;

/// Scripts, styles, images and requests only from the console itself;
/// never framed. ECharts sets element styles, hence 'unsafe-inline' for
/// styles only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'self'";

fn harden(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// An API error: `{"error": "...", "status": 403}` with that HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to change.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// The HTTP status of a protocol error.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::ResourceExhausted | ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        Self::new(status_of(e.kind), e.message)
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request(format!(
            "the query string is not what this call takes: {}",
            e.body_text()
        ))
    }
}

/// A method a route does not serve: the JSON error for the API, a page
/// otherwise.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let message = format!(
        "{} does not take {method} (docs/console.md lists the calls)",
        uri.path()
    );
    if uri.path().starts_with("/api/") {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, message).into_response()
    } else {
        error_page(StatusCode::METHOD_NOT_ALLOWED, "Not allowed", &message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            status: u16,
        }
        let mut r = json(&Body {
            error: &self.message,
            status: self.status.as_u16(),
        });
        *r.status_mut() = self.status;
        r
    }
}

/// `value` as JSON, not cached.
pub fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut r = (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
                .into_response();
            harden(r.headers_mut());
            r
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A file with its media type, not cached (pages) or revalidated (assets).
pub fn file(
    body: impl Into<axum::body::Body>,
    content_type: &str,
    cache: &'static str,
) -> Response {
    let mut r = Response::new(body.into());
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    harden(r.headers_mut());
    r
}

/// An embedded page or asset; 404 if there is none of that name.
pub fn asset(name: &str) -> Response {
    match crate::asset(name) {
        Some(a) if a.content_type.starts_with("text/html") => {
            file(a.body, a.content_type, "no-store")
        }
        Some(a) => file(a.body, a.content_type, "no-cache"),
        None => error_page(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no file {name} in the console."),
        ),
    }
}

/// Text safe inside HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page that says what went wrong, with `status`.
pub fn error_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · confer</title>\
         <link rel=\"stylesheet\" href=\"/assets/console.css\"></head><body class=\"error-page\">\
         <main><h1 id=\"error-title\">{t}</h1><p id=\"error-message\">{m}</p>\
         <p><a href=\"/\">Home</a> · <a href=\"/login\">Sign in as someone else</a></p>\
         <p class=\"status\">HTTP {s}</p></main></body></html>",
        t = escape(title),
        m = escape(message),
        s = status.as_u16()
    );
    let mut r = file(body, "text/html; charset=utf-8", "no-store");
    *r.status_mut() = status;
    r
}

/// Refuses a request that changes something (any method but GET and
/// HEAD) when the browser says it comes from another origin
/// (`Sec-Fetch-Site`, else `Origin` against `Host`): another site, or
/// another port of the same host, cannot make a signed-in browser act.
/// Scripts send neither header and authenticate with a bearer token.
pub async fn same_origin(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let cross = match text("sec-fetch-site") {
        Some(site) => site != "same-origin" && site != "none",
        None => match (text("origin"), text("host")) {
            (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) != Some(host),
            (Some(_), None) => true,
            _ => false,
        },
    };
    if cross {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "this request comes from another site or port: the console accepts changes only              from its own pages (or from scripts with a bearer token)",
        )
        .into_response();
    }
    next.run(request).await
}

/// The JSON body of a request: `Content-Type: application/json` (which a
/// form cannot send) and the shape `T` expects.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_type {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not the JSON expected: {e}")))
}

/// No such page or call: a JSON error under `/api/`, a page elsewhere.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/") {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no API call {}: docs/console.md lists the calls",
                uri.path()
            ),
        )
        .into_response()
    } else {
        error_page(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("There is no page {} here.", uri.path()),
        )
    }
}

/// `/assets/{name}`: scripts, styles and the chart library, served to
/// anyone (the sign-in page needs them); pages only through their routes,
/// after authentication.
pub async fn public_asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    if name.ends_with(".html") {
        return not_found(format!("/assets/{name}").parse().unwrap_or_default()).await;
    }
    asset(&name)
}

/// 303 to `location`.
pub fn redirect(location: &str) -> Response {
    let mut r = Response::new(axum::body::Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_escaping() {
        assert_eq!(
            status_of(ErrorKind::Unauthenticated),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(ErrorKind::PermissionDenied),
            StatusCode::FORBIDDEN
        );
        assert_eq!(status_of(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            escape("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
        let r = error_page(StatusCode::FORBIDDEN, "No", "<script>");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
    }
}
