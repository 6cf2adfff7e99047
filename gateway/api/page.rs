//! The pages: `/lobby` and its live stream `/lobby/events` (public on the LAN unless
//! `api.lobby = "token"`), the dashboard `/` for branch IT, and `/login`, a form that
//! takes the API token and sets a session cookie (HttpOnly, SameSite=Strict) so the
//! browser can show the dashboard. The cookie holds an HMAC of the token, never the token;
//! it opens the pages only (`/api/v1/*` and `/metrics` still want the bearer token, so
//! no page can be made to post a command). Everything a page needs is in the binary.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::{authorized, Api};
use crate::config::LobbyAccess;

/// The session cookie's name.
const COOKIE: &str = "branch_gateway_session";

/// Text for HTML: `& < > " '` escaped.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

/// The session cookie's value for `token`: HMAC-SHA256 of a fixed label, keyed by it.
fn session_value(token: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes())
        .expect("HMAC accepts any key length");
    mac.update(b"branch-gateway page session v1");
    hex::encode(mac.finalize().into_bytes())
}

/// A page request's credentials: the bearer token or the session cookie.
fn page_authorized(api: &Api, headers: &HeaderMap) -> bool {
    use subtle::ConstantTimeEq;
    if authorized(&api.state, headers).is_ok() {
        return true;
    }
    let want = session_value(&api.state.token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .any(|v| bool::from(v.as_bytes().ct_eq(want.as_bytes())))
}

/// Headers every page carries: no framing by other sites, no sniffing, and a policy that
/// lets the page load nothing from anywhere but itself.
fn page_response(body: String) -> Response {
    let mut r = Html(body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn lobby_allowed(api: &Api, headers: &HeaderMap) -> bool {
    api.lobby_access == LobbyAccess::Public || page_authorized(api, headers)
}

/// `GET /lobby`.
pub(super) async fn lobby(State(api): State<Api>, headers: HeaderMap) -> Response {
    if !lobby_allowed(&api, &headers) {
        return Redirect::to("/login?next=lobby").into_response();
    }
    let snap = api.state.live.borrow().clone();
    page_response(super::lobby::page(api.state.language, &api.state.tz, &snap))
}

/// `GET /lobby/events`: the live stream; the current figures at once, then each change.
/// At most `api.max_live_streams` at a time (one more is a 503).
pub(super) async fn lobby_events(State(api): State<Api>, headers: HeaderMap) -> Response {
    if !lobby_allowed(&api, &headers) {
        return super::error(StatusCode::UNAUTHORIZED, "the lobby needs the API token");
    }
    let Ok(permit) = api.streams.clone().try_acquire_owned() else {
        api.stats.note(super::server::Event::MaxLiveStreams);
        return super::busy("too many lobby pages are following the live figures");
    };
    // The current update at once, then each new one; the permit goes with the stream.
    let updates = futures_util::stream::unfold(
        (api.feed.rx.clone(), permit, true),
        |(mut rx, permit, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let text: Arc<String> = rx.borrow_and_update().clone();
            let event = SseEvent::default().data(text.as_str());
            Some((Ok::<_, Infallible>(event), (rx, permit, false)))
        },
    );
    let mut r = Sse::new(updates)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /`: the dashboard, or the login form's address.
pub(super) async fn dashboard(State(api): State<Api>, headers: HeaderMap) -> Response {
    if !page_authorized(&api, &headers) {
        return Redirect::to("/login").into_response();
    }
    let state = api.state.clone();
    let kiosks = state.kiosks.clone();
    let view = super::read(&api, move |c| {
        super::dashboard::View::read(c, &kiosks, crate::model::now_ms())
    })
    .await;
    match view {
        Ok(view) => page_response(super::dashboard::page(&state, &view)),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

#[derive(Deserialize)]
pub(super) struct Next {
    #[serde(default)]
    next: String,
}

/// `GET /login`: the form (`?next=lobby` returns to the lobby after signing in).
pub(super) async fn login_form(axum::extract::Query(q): axum::extract::Query<Next>) -> Response {
    page_response(login_page("", &q.next))
}

/// `POST /login`: the right token sets the session cookie and goes on to the dashboard
/// (or the lobby); a wrong one shows the form again with a 401.
pub(super) async fn login(State(api): State<Api>, Form(form): Form<LoginForm>) -> Response {
    use subtle::ConstantTimeEq;
    if !bool::from(form.token.as_bytes().ct_eq(api.state.token.as_bytes())) {
        api.stats.note(super::server::Event::LoginFailed);
        let mut r = page_response(login_page("That is not the API token.", &form.next));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    let to = if form.next == "lobby" { "/lobby" } else { "/" };
    let mut r = Redirect::to(to).into_response();
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000",
        session_value(&api.state.token)
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn login_page(message: &str, next: &str) -> String {
    let next = if next == "lobby" { "lobby" } else { "" };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><title>branch-gateway: sign in</title>
<style>body{{font-family:sans-serif;background:#2e3440;color:#eceff4;display:grid;place-items:center;height:100vh;margin:0}}
form{{background:#3b4252;padding:2em;border-radius:1em;display:grid;gap:1em;min-width:20em}}
input{{font-size:1.1em;padding:.4em}}button{{font-size:1.1em;padding:.4em}}.err{{color:#bf616a}}</style></head>
<body><form method="post" action="/login"><h1>branch-gateway</h1>
<label>API token (from <code>[api] token</code>)<br><input type="password" name="token" autofocus required></label>
<input type="hidden" name="next" value="{next}">
<p class="err">{}</p><button type="submit">Sign in</button></form></body></html>"#,
        escape(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_the_session_value() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let v = session_value("a-token-of-16-chars");
        assert_eq!(v.len(), 64);
        assert!(!v.contains("a-token"));
        assert_ne!(v, session_value("another-token-16-chars"));
    }
}
