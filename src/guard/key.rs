//! The key of a guarded request: a fingerprint of what it asks for, or the client's `Idempotency-Key`.
//!
//! Canonical form v2 (hashed with SHA-256): the method, the **prefix** of the path before `/openApi`
//! ([`crate::powerjob::served_prefix`]: a path router may put two clusters behind two prefixes; never the
//! `Host`, since clients fail over between addresses), the route, the **principal** (the app: the
//! `X-POWERJOB-APP-ID` header, else the `appId` field; never the token, which the 5.1.0 client's re-send
//! changes), where the fields come from (parameters or a JSON body), and the fields, sorted by name, each
//! length-prefixed so that no two forms run together. The `Idempotency-Key` is scoped the same way (prefix,
//! principal, route).
//!
//! The fields are what PowerJob's controller binds, as it binds them (`shared/POWERJOB.md` §1, §10):
//! - `@RequestParam` endpoints ([`reads`]: runJob, runWorkflow, retryInstance, retryWfInstance, copyJob,
//!   copyWorkflow) bind the query and an `application/x-www-form-urlencoded` body, as one set of parameters.
//!   Each parameter the controller declares is keyed by its bound value (see `spring_long`): `jobId=05`, `+5`,
//!   ` 5`, `0x5` are one key, `delay=` is `delay=0`. A missing parameter is keyed as null, a value Spring cannot
//!   bind (`jobId=abc`: the server answers with a binding error and creates nothing) by its text, which no
//!   bound value can equal. Parameters the controller does not declare are not keyed: the server ignores
//!   them, so two calls that differ only there are one call. A route's `fields` setting still picks among
//!   the declared parameters and may add undeclared ones (keyed by text).
//!   A JSON body there is ignored by the server (Undertow parses a body into parameters only when the
//!   Content-Type starts with exactly `application/x-www-form-urlencoded`), so it is not keyed either: the
//!   query is the call. Any other body is refused as before ([`BadPayload::MediaType`]): a `multipart/*`
//!   body would be bound by Spring's multipart resolver, and a form type in another letter case would not be
//!   parsed by Undertow although it looks like a form.
//! - JSON endpoints (saveJob, saveWorkflow, addWorkflowNode) bind the `@RequestBody` only; the query is not
//!   keyed. Each top-level member is compact JSON with sorted keys (a non-object body is one member named
//!   `""`). Integers are exact to 64 bits, so int64 ids above 2^53 do not collide. A body with a number that
//!   is not an exact 64-bit integer (a fraction, an exponent, a larger integer) is also keyed by its bytes:
//!   serde_json rounds such numbers to `f64`, and two different numbers must not make one key. A form body
//!   there (the server refuses it) is keyed as parameters, apart from any JSON body.
//! - Any other endpoint enabled in config is keyed as before: every query, form and JSON field, by its text.
//! - `appId` is always a field where it is one: a call without it binds null and creates nothing, so the
//!   header naming the same app does not make it the call that has it.
//! - A missing `instanceParams` / `initParams` equals an empty one, a missing `delay` equals `0`, so the
//!   client's omission of an empty `instanceParams` does not make a different key.
//!
//! What cannot be keyed the way the server reads it is refused ([`BadPayload`]), never forwarded under a key that
//! might merge two different calls: a non-empty body that is neither a form nor JSON (see above for
//! `@RequestParam` endpoints), invalid percent-encoding or invalid UTF-8 in a form or the query (on every
//! route, even where the query is not keyed), JSON that does not parse where the JSON is keyed (serde_json
//! stops at 128 levels of nesting, so a deep body is refused rather than recursed into), and a keyed field
//! given twice (Spring binds the first of a `Long`'s values, `ArrayToObjectConverter`, and joins a `String`'s
//! with commas, `ArrayToStringConverter`, with the query's values first; refused rather than modelled).
//! A field that is not keyed may come twice: the server does not read it.
//!
//! Pure functions; no I/O.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::powerjob;
use crate::store::{hex, Key};

/// The parts of a request the key is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The app the request acts for (may be empty when the request names none).
    pub principal: String,
    /// `(name, value)` sorted by name, each name once.
    pub fields: Vec<(String, String)>,
    /// The fields are a JSON body's members (else parameters: query and form): `{"n":1}` and `n=1` are
    /// different calls to the server, and must not share a key.
    pub json: bool,
}

/// How PowerJob's controller reads a guarded endpoint (`OpenAPIController`, 4.3.x to 5.1.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// `@RequestParam`s (declared or by Spring's default for simple types), from the query and a form body.
    Params(&'static [Param]),
    /// A `@RequestBody` read by Jackson.
    JsonBody,
    /// Not known here (an endpoint enabled in config): every field counts, by its text.
    Unknown,
}

/// One parameter a controller method declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    /// `Long` (else `String`).
    pub long: bool,
    /// The key of a missing or null value: what the server does with null.
    pub null: &'static str,
}

const fn long(name: &'static str) -> Param {
    Param {
        name,
        long: true,
        null: "",
    }
}

/// A `Long` the server reads as 0 when null (`delay == null ? 0 : delay` in runJob and runWorkflow).
const fn long_or_zero(name: &'static str) -> Param {
    Param {
        name,
        long: true,
        null: "0",
    }
}

/// A `String`; null keys as empty (the 5.1.0 client leaves an empty `instanceParams` out).
const fn text(name: &'static str) -> Param {
    Param {
        name,
        long: false,
        null: "",
    }
}

/// What the controller reads on `route` (`shared/POWERJOB.md` §1). copyJob declares `jobId` only: the `appId`
/// the client sends is not bound (it still names the principal).
pub fn reads(route: &str) -> Reads {
    const RUN_JOB: &[Param] = &[
        long("appId"),
        long("jobId"),
        text("instanceParams"),
        long_or_zero("delay"),
    ];
    const RUN_WORKFLOW: &[Param] = &[
        long("workflowId"),
        long("appId"),
        text("initParams"),
        long_or_zero("delay"),
    ];
    const RETRY_INSTANCE: &[Param] = &[long("instanceId"), long("appId")];
    const RETRY_WF_INSTANCE: &[Param] = &[long("wfInstanceId"), long("appId")];
    const COPY_JOB: &[Param] = &[long("jobId")];
    const COPY_WORKFLOW: &[Param] = &[long("workflowId"), long("appId")];
    match route {
        "runJob" => Reads::Params(RUN_JOB),
        "runWorkflow" => Reads::Params(RUN_WORKFLOW),
        "retryInstance" => Reads::Params(RETRY_INSTANCE),
        "retryWfInstance" => Reads::Params(RETRY_WF_INSTANCE),
        "copyJob" => Reads::Params(COPY_JOB),
        "copyWorkflow" => Reads::Params(COPY_WORKFLOW),
        "saveJob" | "saveWorkflow" | "addWorkflowNode" => Reads::JsonBody,
        _ => Reads::Unknown,
    }
}

/// Why a guarded request's fields cannot be read (the client gets 400 or 415, nothing is forwarded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadPayload {
    /// A non-empty body that is neither `application/x-www-form-urlencoded` nor JSON.
    #[error("a guarded call's body must be application/x-www-form-urlencoded or application/json, not {content_type:?}")]
    MediaType { content_type: String },
    /// The form, the query or the JSON does not parse, or names a field twice.
    #[error("{0}")]
    Malformed(String),
}

/// Reads the payload of a request to `route`. `app_header` is the `X-POWERJOB-APP-ID` value, if any;
/// `selected` limits the fields to those names (the route's `fields` setting).
pub fn payload(
    route: &str,
    content_type: Option<&str>,
    query: Option<&str>,
    body: &[u8],
    app_header: Option<&str>,
    selected: Option<&[String]>,
) -> Result<Payload, BadPayload> {
    // The query is decoded strictly on every route, read or not: what does not decode is refused.
    let query = match query {
        Some(query) => form_fields(query.as_bytes()).map_err(|why| malformed("query", why))?,
        None => Vec::new(),
    };
    let header = app_header.filter(|v| powerjob::header_present(v));
    let reads = reads(route);
    let (mut fields, json) = match reads {
        Reads::Params(_) => (params_read(query, content_type, body)?, false),
        Reads::JsonBody => body_fields(content_type, body)?,
        Reads::Unknown => {
            let (body, json) = body_fields(content_type, body)?;
            let mut fields = query;
            fields.extend(body);
            (fields, json)
        }
    };
    if let Reads::Params(params) = reads {
        // Only what the controller binds, the principal and what the setting names are keyed (or refused
        // when given twice); the rest does not change what the server does.
        let keyed = |name: &str| {
            name == "appId"
                || params.iter().any(|p| p.name == name)
                || selected.is_some_and(|s| s.iter().any(|s| s == name))
        };
        fields.retain(|(name, _)| keyed(name));
    }
    refuse_duplicates(&fields)?;
    let principal = match (header, reads) {
        (Some(header), _) => header.to_string(),
        (None, Reads::Params(_)) => fields
            .iter()
            .find(|(k, _)| k == "appId")
            .map(|(_, v)| canonical_long(v, ""))
            .unwrap_or_default(),
        (None, Reads::JsonBody | Reads::Unknown) => fields
            .iter()
            .find(|(k, _)| k == "appId")
            .map(|(_, v)| v.trim_matches('"').to_string())
            .unwrap_or_default(),
    };
    if let Reads::Params(params) = reads {
        let mut bound = Vec::with_capacity(params.len() + fields.len());
        for param in params {
            // Moved out of `fields` (each name is there once): the order does not matter, all are sorted below.
            let given = fields.iter().position(|(k, _)| k == param.name);
            bound.push(match given.map(|at| fields.swap_remove(at)) {
                None => (param.name.to_string(), param.null.to_string()),
                Some((name, value)) if param.long => {
                    (name, canonical_long_owned(value, param.null))
                }
                Some(given) => given,
            });
        }
        // Undeclared names the setting asks for, by their text.
        fields.retain(|(name, _)| name != "appId");
        bound.append(&mut fields);
        fields = bound;
    }
    if let Some(selected) = selected {
        fields.retain(|(name, _)| selected.iter().any(|s| s == name));
    }
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Payload {
        principal,
        fields,
        json,
    })
}

/// The parameters a `@RequestParam` endpoint binds: the query, and the body when Undertow parses it as a form.
fn params_read(
    mut query: Vec<(String, String)>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Vec<(String, String)>, BadPayload> {
    let raw = content_type.unwrap_or("");
    let kind = || raw.to_ascii_lowercase();
    if body.is_empty() {
        // Query parameters only: the Content-Type does not matter.
    } else if raw.starts_with(FORM) {
        // Undertow's `FormEncodedDataDefinition`: `mimeType.startsWith("application/x-www-form-urlencoded")`.
        let form = form_fields(body).map_err(|why| malformed("form body", why))?;
        if query.is_empty() {
            query = form;
        } else {
            query.extend(form);
        }
    } else if kind().contains("json")
        && !kind().starts_with(FORM)
        && !kind().starts_with("multipart/")
    {
        // The server binds no parameter from a JSON body: the query alone is the call.
    } else {
        return Err(BadPayload::MediaType {
            content_type: content_type.unwrap_or("(none)").to_string(),
        });
    }
    Ok(query)
}

const FORM: &str = "application/x-www-form-urlencoded";

/// The fields of a body read as today for JSON and unknown endpoints: a form's fields or a JSON body's
/// members; `true` when they are JSON members.
fn body_fields(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(Vec<(String, String)>, bool), BadPayload> {
    let kind = content_type.unwrap_or("").to_ascii_lowercase();
    if body.is_empty() {
        return Ok((Vec::new(), false));
    }
    if kind.starts_with(FORM) {
        let fields = form_fields(body).map_err(|why| malformed("form body", why))?;
        return Ok((fields, false));
    }
    if !kind.contains("json") {
        return Err(BadPayload::MediaType {
            content_type: content_type.unwrap_or("(none)").to_string(),
        });
    }
    let value = serde_json::from_slice::<Value>(body)
        .map_err(|err| BadPayload::Malformed(format!("the JSON body does not parse: {err}")))?;
    let mut fields = Vec::new();
    if has_inexact_number(&value) {
        fields.push(("\u{0}body".to_string(), hex(&Sha256::digest(body))));
    }
    match value {
        Value::Object(members) => {
            fields.extend(members.into_iter().map(|(k, v)| (k, canonical_json(&v))))
        }
        other => fields.push((String::new(), canonical_json(&other))),
    }
    Ok((fields, true))
}

fn refuse_duplicates(fields: &[(String, String)]) -> Result<(), BadPayload> {
    let mut names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    match names.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(twice) => Err(BadPayload::Malformed(format!(
            "the field {:?} is given more than once",
            twice[0]
        ))),
        None => Ok(()),
    }
}

fn malformed(what: &str, why: String) -> BadPayload {
    BadPayload::Malformed(format!("the {what} is not valid form encoding: {why}"))
}

/// The key of a form or query value bound to a `Long` parameter: the number in decimal, `null` (what the
/// server does with null) for none, or the text itself when Spring cannot bind it (or when runonce cannot
/// tell), which no bound value's key can equal: every key of a number parses back to that number.
fn canonical_long(text: &str, null: &str) -> String {
    if plain_decimal(text) {
        return text.to_string();
    }
    match spring_long(text) {
        Some(Some(n)) => n.to_string(),
        Some(None) => null.to_string(),
        None => text.to_string(),
    }
}

/// [`canonical_long`] of a value owned already: a plain decimal is its own key, without a copy.
fn canonical_long_owned(text: String, null: &str) -> String {
    if plain_decimal(&text) {
        return text;
    }
    canonical_long(&text, null)
}

/// Decimal digits without a leading zero (or `0` itself), short enough for an i64: the number's decimal form is
/// the text (most values; spares `spring_long`'s copy and the number's formatting).
fn plain_decimal(text: &str) -> bool {
    let bytes = text.as_bytes();
    (1..=18).contains(&bytes.len())
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes[0] != b'0' || bytes.len() == 1)
}

/// The `Long` Spring MVC binds from a form or query value: `Some(None)` for null, `None` when it fails (or
/// when runonce cannot be sure what Java makes of it). Spring 5.3.31 (Spring Boot 2.7.18), in order:
/// - `TypeConverterDelegate.convertIfNecessary` asks the conversion service first:
///   `StringToNumberConverterFactory` gives null for `""`, else `NumberUtils.parseNumber(text, Long.class)`.
///   If that fails it falls back to the default editor, `CustomNumberEditor(Long.class, allowEmpty=true)`,
///   which gives null when `!StringUtils.hasText(text)` (so a blank value is null too), else the same
///   `parseNumber`.
/// - `NumberUtils.parseNumber` removes **every** `Character.isWhitespace` character
///   (`StringUtils.trimAllWhitespace`: `1 2` is 12), then `isHexNumber` (an optional `-`, then `0x`, `0X` or
///   `#`) → `Long.decode` (hex; its octal branch cannot be reached from there), else `Long.valueOf` (decimal:
///   `010` is 10, a leading `+` or `-`, no other sign).
/// - Java's `Character.digit` also takes non-ASCII digits, and U+180E was whitespace before Java 9: such
///   values stay keyed by their text (`None`), which can split a key but never merge two.
fn spring_long(text: &str) -> Option<Option<i64>> {
    if !text.is_ascii() && text.chars().any(|c| c == '\u{180E}') {
        return None;
    }
    let trimmed: String = text.chars().filter(|&c| !java_whitespace(c)).collect();
    if trimmed.is_empty() {
        return Some(None);
    }
    let (negative, magnitude) = match trimmed.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, trimmed.strip_prefix('+').unwrap_or(&trimmed)),
    };
    let hex = ["0x", "0X", "#"]
        .iter()
        .find_map(|p| magnitude.strip_prefix(p))
        // `isHexNumber` looks after a `-` only: `+0x5` goes to Long.valueOf, which refuses it.
        .filter(|_| negative || !trimmed.starts_with('+'));
    let (digits, radix) = match hex {
        Some(digits) => (digits, 16),
        None => (magnitude, 10),
    };
    if digits.is_empty() || !digits.bytes().all(|b| (b as char).is_digit(radix)) {
        return None;
    }
    let mut value: i128 = 0;
    for b in digits.bytes() {
        let digit = i128::from((b as char).to_digit(radix)?);
        value = value.checked_mul(i128::from(radix))?.checked_add(digit)?;
        if value > i128::from(u64::MAX) {
            return None;
        }
    }
    let value = if negative { -value } else { value };
    i64::try_from(value).ok().map(Some)
}

/// Java's `Character.isWhitespace` (Java 9 and later, minus U+180E, see [`spring_long`]): the space
/// separators other than the no-break ones (U+00A0, U+2007, U+202F), the line and paragraph separators, and
/// the ASCII controls TAB, LF, VT, FF, CR and FS..US.
fn java_whitespace(c: char) -> bool {
    matches!(c,
        '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r' | '\u{1C}'..='\u{1F}' | ' '
        | '\u{1680}' | '\u{2000}'..='\u{2006}' | '\u{2008}'..='\u{200A}'
        | '\u{2028}' | '\u{2029}' | '\u{205F}' | '\u{3000}')
}

/// Whether a JSON body (saveJob, saveWorkflow) names the record it updates: then it creates nothing new.
/// `addWorkflowNode` sends an array of nodes: it updates only when every node names one.
///
/// A record is named only when Jackson binds its `id` (a `Long` in `SaveJobInfoRequest`,
/// `SaveWorkflowRequest` and `SaveWorkflowNodeRequest`) to a number; PowerJob creates a record whenever it
/// binds null. Jackson 2.13.5 with Spring Boot 2.7's defaults (PowerJob configures no `ObjectMapper` of its
/// own), `NumberDeserializers.LongDeserializer` → `StdDeserializer._parseLong`:
/// - an integer token → `getLongValue()`; beyond 64 bits it fails;
/// - a float token → `ACCEPT_FLOAT_AS_INT` (on by default in `CoercionConfigs`) → `getValueAsLong()`, which
///   truncates (`0.5` is 0) and fails outside the `long` range;
/// - `null` → null;
/// - a string: `""` → null (`CoercionConfigs.findCoercion`: EmptyString to a scalar is `AsNull`), blank
///   (every char ≤ U+0020, `_isBlank`) → null (`findCoercionFromBlankString`), else `trim()` (Java's: chars
///   ≤ U+0020), `"null"` → null (`_checkTextualNull`), else `NumberInput.parseLong` (Integer/Long.parseLong:
///   optional sign, decimal digits only, so `0x5` and `5.0` fail);
/// - `true`, `[]`, `[5]`, `{}` → fail (no coercion from booleans, arrays unwrapped only with
///   `UNWRAP_SINGLE_VALUE_ARRAYS`, off).
///
/// A failure answers an error before anything is inserted: not an update, but nothing is created either, so it
/// is guarded (keying it is harmless). A duplicate member is bound from its last occurrence, in Jackson and in
/// serde_json alike.
pub fn names_existing_record(body: &[u8]) -> bool {
    fn names_one(record: &Value) -> bool {
        record.get("id").is_some_and(jackson_binds_a_long)
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(nodes)) => !nodes.is_empty() && nodes.iter().all(names_one),
        Ok(record) => names_one(&record),
        Err(_) => false,
    }
}

/// Whether Jackson binds `value` to a non-null `Long` (see [`names_existing_record`]).
fn jackson_binds_a_long(value: &Value) -> bool {
    match value {
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .is_some_and(|f| f.is_finite() && f.abs() < 9.2e18),
        Value::Number(n) => n.as_i64().is_some(),
        Value::String(s) => {
            let t = s.trim_matches(|c: char| c <= ' ');
            let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
            !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && t.parse::<i64>().is_ok()
        }
        _ => false,
    }
}

/// The fingerprint of `payload` on `method` `route` behind the path `prefix`
/// ([`crate::powerjob::served_prefix`]): 64 hex characters.
pub fn fingerprint(method: &str, prefix: &str, route: &str, payload: &Payload) -> Key {
    let source = if payload.json { "json" } else { "params" };
    let parts = [method, prefix, route, payload.principal.as_str(), source];
    let fields = payload
        .fields
        .iter()
        .flat_map(|(n, v)| [n.as_str(), v.as_str()]);
    digest_of(b"runonce-fp-v2\n", parts.into_iter().chain(fields))
}

/// The key of a request that carries an `Idempotency-Key`: the client's key within (prefix, principal, route).
pub fn idempotency_key(prefix: &str, route: &str, principal: &str, client_key: &str) -> Key {
    digest_of(b"runonce-ik-v2\n", [prefix, principal, route, client_key])
}

/// SHA-256 of `tag` and each part length-prefixed, written to one buffer and hashed at once (a hash update
/// per piece cost more than the hashing, callgrind).
fn digest_of<'a>(tag: &[u8], parts: impl IntoIterator<Item = &'a str> + Clone) -> Key {
    let len = parts
        .clone()
        .into_iter()
        .map(|p| 8 + p.len())
        .sum::<usize>();
    let mut input = Vec::with_capacity(tag.len() + len);
    input.extend_from_slice(tag);
    for part in parts {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part.as_bytes());
    }
    Key::from_digest(&Sha256::digest(&input))
}

/// The fields as `{"name":"digest"}` JSON, stored beside a record to name the fields that differ later:
/// the first 16 hex digits of each value's SHA-256, by name in byte order. Written directly, byte for byte
/// what serde_json makes of the same map (`tests::field_digests_are_what_serde_json_writes`): the fields are
/// sorted by name and each name is there once.
pub fn field_digests(payload: &Payload) -> String {
    let mut out = String::with_capacity(2 + payload.fields.len() * 40);
    out.push('{');
    for (i, (name, value)) in payload.fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if name.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            out.push_str(&Value::from(name.as_str()).to_string());
        } else {
            out.push('"');
            out.push_str(name);
            out.push('"');
        }
        out.push_str(":\"");
        out.push_str(&hex(&Sha256::digest(value.as_bytes())[..8]));
        out.push('"');
    }
    out.push('}');
    out
}

/// The names whose digests differ between two `field_digests` values, sorted.
pub fn differing_fields(stored: &str, now: &str) -> Vec<String> {
    let parse =
        |s: &str| serde_json::from_str::<serde_json::Map<String, Value>>(s).unwrap_or_default();
    let (a, b) = (parse(stored), parse(now));
    let mut names: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Decodes `application/x-www-form-urlencoded` strictly: `+` is a space, `%XX` a byte, and the decoded bytes
/// must be UTF-8. Empty pairs (`a=1&&b=2`) are skipped and a name without `=` has an empty value, as the
/// `form_urlencoded` crate (and Spring) read them.
fn form_fields(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    bytes
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            Ok((form_decode(name)?, form_decode(value)?))
        })
        .collect()
}

fn form_decode(encoded: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        match encoded[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = encoded.get(i + 1..i + 3).and_then(|h| {
                    let text = std::str::from_utf8(h).ok()?;
                    // from_str_radix accepts a leading `+`; only two hex digits are an escape.
                    h.iter()
                        .all(u8::is_ascii_hexdigit)
                        .then(|| u8::from_str_radix(text, 16).ok())?
                });
                let Some(byte) = hex else {
                    let shown = String::from_utf8_lossy(&encoded[i..encoded.len().min(i + 3)]);
                    return Err(format!("{shown:?} is not a %XX escape"));
                };
                out.push(byte);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|err| format!("decoded bytes are not UTF-8 ({err})"))
}

/// Whether a number in `value` is not an exact 64-bit integer (serde_json holds it as a rounded `f64`).
/// Recursion is bounded: serde_json refuses documents nested deeper than 128 levels.
fn has_inexact_number(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_inexact_number),
        Value::Object(members) => members.values().any(has_inexact_number),
        _ => false,
    }
}

/// Compact JSON with object keys sorted (serde_json's map is ordered by key without `preserve_order`).
fn canonical_json(value: &Value) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    fn run_job(body: &str, app_header: Option<&str>) -> Key {
        fingerprint(
            "POST",
            "",
            "runJob",
            &payload("runJob", FORM, None, body.as_bytes(), app_header, None).unwrap(),
        )
    }

    #[test]
    fn okhttp_encodings_and_field_order_do_not_change_the_key() {
        // OkHttp encodes a space as %20; a browser form would use +. Spring decodes both to a space.
        let okhttp = run_job(
            "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%20w%22%7D",
            None,
        );
        let plus = run_job(
            "appId=1&instanceParams=%7B%22k%22:%22v+w%22%7D&jobId=5&delay=0",
            None,
        );
        assert_eq!(okhttp, plus);
        let other = run_job(
            "jobId=5&delay=0&appId=1&instanceParams=%7B%22k%22%3A%22v%2Bw%22%7D",
            None,
        );
        assert_ne!(okhttp, other, "%2B is a literal +, not a space");
    }

    #[test]
    fn missing_fields_equal_their_defaults() {
        assert_eq!(
            run_job("jobId=5&appId=1", None),
            run_job("jobId=5&delay=0&appId=1&instanceParams=", None)
        );
        assert_ne!(
            run_job("jobId=5&appId=1", None),
            run_job("jobId=5&delay=1000&appId=1", None)
        );
    }

    #[test]
    fn the_principal_is_the_app_from_header_or_field_never_the_token() {
        let field = run_job("jobId=5&delay=0&appId=1", None);
        assert_eq!(field, run_job("jobId=5&delay=0&appId=1", Some("1")));
        assert_ne!(field, run_job("jobId=5&delay=0&appId=2", None));
        assert_eq!(
            run_job("jobId=5&appId=1", Some("null")),
            field,
            "`null` counts as absent"
        );
        // The header names the app, but the controller binds the form's appId: without it, nothing runs.
        assert_ne!(run_job("jobId=5&delay=0", Some("1")), field);
        let read = |header| payload("runJob", FORM, None, b"jobId=5&appId=01", header, None);
        assert_eq!(read(None).unwrap().principal, "1");
        assert_eq!(read(Some("7")).unwrap().principal, "7");
    }

    #[test]
    fn different_jobs_params_and_delays_differ() {
        let base = run_job("jobId=5&delay=0&appId=1", None);
        for other in [
            "jobId=6&delay=0&appId=1",
            "jobId=5&delay=1&appId=1",
            "jobId=5&delay=0&appId=1&instanceParams=x",
        ] {
            assert_ne!(base, run_job(other, None), "{other}");
        }
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        assert_ne!(
            run_job("jobId=5&instanceParams=a%26delay%3D1&appId=1", None),
            run_job("jobId=5&instanceParams=a&delay=1&appId=1", None)
        );
    }

    #[test]
    fn json_is_canonical_and_int64_exact() {
        let json = Some("application/json; charset=utf-8");
        let fp = |body: &str| {
            fingerprint(
                "POST",
                "",
                "saveJob",
                &payload("saveJob", json, None, body.as_bytes(), None, None).unwrap(),
            )
        };
        assert_eq!(
            fp(r#"{"appId":1,"jobName":"a","extra":{"y":1,"x":2}}"#),
            fp(r#"{ "extra": {"x":2, "y":1}, "jobName":"a", "appId":1 }"#)
        );
        assert_ne!(
            fp(r#"{"appId":1,"n":754612332134400064}"#),
            fp(r#"{"appId":1,"n":754612332134400065}"#)
        );
        assert_ne!(
            fp(r#"{"appId":1,"jobName":"a"}"#),
            fp(r#"{"appId":2,"jobName":"a"}"#)
        );
    }

    #[test]
    fn what_cannot_be_keyed_as_the_server_reads_it_is_refused() {
        let json = Some("application/json");
        let refused = |content_type: Option<&str>, body: &[u8]| {
            payload("saveJob", content_type, None, body, None, None).unwrap_err()
        };
        // Deeper than serde_json's 128 levels: refused, not recursed into.
        let deep = "[".repeat(100_000);
        assert!(matches!(
            refused(json, deep.as_bytes()),
            BadPayload::Malformed(_)
        ));
        assert!(matches!(
            refused(json, b"\xff\xfe not json"),
            BadPayload::Malformed(_)
        ));
        for form in [
            &b"jobId=%zz&appId=1"[..],
            b"jobId=5%",
            b"jobId=5%4",
            b"jobId=%+1",
            b"appId=%ff",
            b"a=%C3%28",
        ] {
            let err = refused(FORM, form);
            assert!(matches!(err, BadPayload::Malformed(_)), "{form:?}: {err:?}");
        }
        let err = payload("runJob", FORM, Some("jobId=%e9"), b"appId=1", None, None).unwrap_err();
        assert!(err.to_string().contains("query"), "{err}");
        let err = refused(FORM, b"jobId=5&appId=1&jobId=6");
        assert!(err.to_string().contains("\"jobId\""), "{err}");
        let err = payload(
            "runJob",
            FORM,
            Some("appId=1"),
            b"appId=1&jobId=5",
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("appId"), "{err}");
        assert!(matches!(
            refused(Some("text/plain"), b"jobId=5"),
            BadPayload::MediaType { .. }
        ));
        assert!(matches!(
            refused(None, b"jobId=5"),
            BadPayload::MediaType { .. }
        ));
        // No body: the query alone, whatever the Content-Type says.
        assert!(payload(
            "runJob",
            Some("text/plain"),
            Some("jobId=5&appId=1"),
            b"",
            None,
            None
        )
        .is_ok());
        // Valid UTF-8 through escapes, and empty pairs, are fine.
        let p = payload(
            "runJob",
            FORM,
            None,
            b"instanceParams=%C3%A9t%C3%A9&&appId=1&flag",
            None,
            None,
        )
        .unwrap();
        assert!(
            p.fields
                .contains(&("instanceParams".into(), "\u{e9}t\u{e9}".into())),
            "{p:?}"
        );
        assert!(
            !p.fields.iter().any(|(k, _)| k == "flag"),
            "runJob does not bind it: {p:?}"
        );
        let p = payload("stopInstance", FORM, None, b"appId=1&&flag", None, None).unwrap();
        assert!(p.fields.contains(&("flag".into(), String::new())), "{p:?}");
    }

    #[test]
    fn numbers_serde_json_rounds_never_share_a_key() {
        let json = Some("application/json");
        let fp = |body: &str| {
            fingerprint(
                "POST",
                "",
                "saveJob",
                &payload("saveJob", json, None, body.as_bytes(), None, None).unwrap(),
            )
        };
        // Both round to the same f64.
        assert_ne!(
            fp(r#"{"appId":1,"n":123456789012345678901234567890}"#),
            fp(r#"{"appId":1,"n":123456789012345678901234567891}"#)
        );
        assert_ne!(
            fp(r#"{"appId":1,"x":0.10000000000000000001}"#),
            fp(r#"{"appId":1,"x":0.1}"#)
        );
        assert_eq!(
            fp(r#"{"appId":1,"x":0.5}"#),
            fp(r#"{"appId":1,"x":0.5}"#),
            "identical bytes still share a key"
        );
    }

    #[test]
    fn selected_fields_and_query_parameters() {
        let only = vec!["jobId".to_string()];
        let a = payload(
            "runJob",
            FORM,
            None,
            b"jobId=5&delay=0&appId=1",
            None,
            Some(&only),
        )
        .unwrap();
        let b = payload(
            "runJob",
            FORM,
            None,
            b"jobId=5&delay=99&appId=1",
            None,
            Some(&only),
        )
        .unwrap();
        assert_eq!(
            fingerprint("POST", "", "runJob", &a),
            fingerprint("POST", "", "runJob", &b)
        );
        let query = payload("runJob", None, Some("jobId=5&appId=1"), b"", None, None).unwrap();
        assert_eq!(query.principal, "1");
        assert!(query.fields.contains(&("jobId".into(), "5".into())));
    }

    #[test]
    fn differing_fields_are_named() {
        let a = payload("runJob", FORM, None, b"jobId=5&delay=0&appId=1", None, None).unwrap();
        let b = payload(
            "runJob",
            FORM,
            None,
            b"jobId=6&delay=0&appId=1&instanceParams=x",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            differing_fields(&field_digests(&a), &field_digests(&b)),
            vec!["instanceParams", "jobId"]
        );
        assert!(differing_fields(&field_digests(&a), &field_digests(&a)).is_empty());
    }

    #[test]
    fn save_calls_with_an_id_name_an_existing_record() {
        assert!(names_existing_record(br#"{"id":3,"jobName":"a"}"#));
        assert!(!names_existing_record(br#"{"id":null,"jobName":"a"}"#));
        assert!(!names_existing_record(br#"{"jobName":"a"}"#));
        assert!(names_existing_record(br#"[{"id":1},{"id":2}]"#));
        assert!(!names_existing_record(br#"[{"id":1},{"nodeName":"x"}]"#));
    }

    #[test]
    fn idempotency_keys_are_scoped_to_prefix_principal_and_route() {
        assert_ne!(
            idempotency_key("", "runJob", "1", "k"),
            idempotency_key("", "runJob", "2", "k")
        );
        assert_ne!(
            idempotency_key("", "runJob", "1", "k"),
            idempotency_key("", "runWorkflow", "1", "k")
        );
        assert_ne!(
            idempotency_key("/a", "runJob", "1", "k"),
            idempotency_key("/b", "runJob", "1", "k")
        );
        assert_eq!(
            idempotency_key("", "runJob", "1", "k"),
            idempotency_key("", "runJob", "1", "k")
        );
    }

    #[test]
    fn a_body_app_stays_in_the_key_whatever_the_header_says() {
        let json = Some("application/json");
        let fp = |body: &str| {
            fingerprint(
                "POST",
                "",
                "saveJob",
                &payload("saveJob", json, None, body.as_bytes(), Some("1"), None).unwrap(),
            )
        };
        assert_ne!(
            fp(r#"{"appId":2,"jobName":"a"}"#),
            fp(r#"{"appId":3,"jobName":"a"}"#)
        );
        // Jackson binds a null appId from the second: another call, even though the header names app 1.
        assert_ne!(fp(r#"{"appId":1,"jobName":"a"}"#), fp(r#"{"jobName":"a"}"#));
    }

    // ---- The key as PowerJob binds the call (issues 7, 8 and 9): tables of calls that must share a key
    // and calls that must not.

    /// The key of `POST target` (path and query) as the engine makes it, or why the call is refused.
    fn key_at(
        target: &str,
        content_type: Option<&str>,
        body: &str,
        app_header: Option<&str>,
        selected: Option<&[String]>,
    ) -> Result<Key, BadPayload> {
        let uri: http::Uri = target.parse().expect("a test target parses");
        let route = crate::powerjob::served_endpoint(uri.path())
            .expect("a test target is an OpenAPI path")
            .into_owned();
        let read = payload(
            &route,
            content_type,
            uri.query(),
            body.as_bytes(),
            app_header,
            selected,
        )?;
        let prefix = crate::powerjob::served_prefix(uri.path()).expect("an OpenAPI path");
        Ok(fingerprint("POST", &prefix, &route, &read))
    }

    /// One call of a table: target, Content-Type, body, `X-POWERJOB-APP-ID`.
    type Call<'a> = (&'a str, Option<&'a str>, &'a str, Option<&'a str>);

    const JSON: Option<&str> = Some("application/json");

    /// Checks every pair; returns the failures (so that one run names them all).
    fn check_pairs(same: bool, pairs: &[(Call, Call)]) -> Vec<String> {
        let key_of = |call: &Call| {
            let (target, content_type, body, app) = *call;
            key_at(target, content_type, body, app, None)
                .map_err(|err| format!("{call:?} is refused: {err}"))
        };
        let mut failures = Vec::new();
        for (a, b) in pairs {
            match (key_of(a), key_of(b)) {
                (Ok(ka), Ok(kb)) if (ka == kb) != same => {
                    let verb = if same { "differ" } else { "share a key" };
                    failures.push(format!("{a:?} and {b:?} {verb}"));
                }
                (Ok(_), Ok(_)) => {}
                (Err(err), _) | (_, Err(err)) => failures.push(err),
            }
        }
        failures
    }

    #[test]
    fn form_fields_are_keyed_as_spring_binds_them() {
        const RUN: &str = "/openApi/runJob";
        let run = |body| (RUN, FORM, body, None);
        let same: Vec<(Call, Call)> = vec![
            // Long: NumberUtils.parseNumber strips all whitespace, reads + / -, 0x / 0X / # as hex, and a
            // leading 0 as decimal (Long.valueOf, not Long.decode's octal).
            (
                run("jobId=5&appId=1&delay=0"),
                run("jobId=05&appId=1&delay=0"),
            ),
            (run("jobId=5&appId=1"), run("jobId=%2B5&appId=1")),
            (run("jobId=5&appId=1"), run("jobId=%205&appId=1")),
            (run("jobId=5&appId=1"), run("jobId=5%09&appId=1")),
            (run("jobId=5&appId=1"), run("jobId=0x5&appId=1")),
            (run("jobId=5&appId=1"), run("jobId=0X5&appId=1")),
            (run("jobId=5&appId=1"), run("jobId=%235&appId=1")),
            (run("jobId=12&appId=1"), run("jobId=1%202&appId=1")),
            (run("jobId=-5&appId=1"), run("jobId=-0x5&appId=1")),
            (run("jobId=5&appId=1"), run("jobId=5&appId=01")),
            (run("jobId=5&appId=1"), run("jobId=5&appId=0x1")),
            // delay: empty or blank binds null, which runJob reads as 0.
            (
                run("jobId=5&appId=1&delay=0"),
                run("jobId=5&appId=1&delay="),
            ),
            (
                run("jobId=5&appId=1&delay=0"),
                run("jobId=5&appId=1&delay=%20"),
            ),
            (
                run("jobId=5&appId=1&delay=0"),
                run("jobId=5&appId=1&delay=-0"),
            ),
            (run("jobId=5&appId=1&delay=0"), run("jobId=5&appId=1")),
            // jobId: empty and blank both bind null.
            (run("jobId=&appId=1"), run("jobId=%20&appId=1")),
            (run("jobId=&appId=1"), run("appId=1")),
            // A field the controller does not bind changes nothing the server does.
            (run("jobId=5&appId=1"), run("jobId=5&appId=1&foo=bar")),
            (run("jobId=5&appId=1"), run("jobId=5&appId=1&JobId=6")),
            // A JSON body on a @RequestParam endpoint is ignored by the server: only the query is bound.
            (
                ("/openApi/runJob?jobId=5&appId=1", None, "", None),
                (
                    "/openApi/runJob?jobId=5&appId=1",
                    JSON,
                    r#"{"jobId":6}"#,
                    None,
                ),
            ),
            (
                (
                    "/openApi/runJob?jobId=5&appId=1",
                    JSON,
                    "not even JSON",
                    None,
                ),
                ("/openApi/runJob?jobId=0x5&appId=1", None, "", None),
            ),
            // Query and form body are one namespace to Spring.
            (
                ("/openApi/runJob?jobId=5", FORM, "appId=1", None),
                (RUN, FORM, "jobId=5&appId=1", None),
            ),
            // The header is the principal; the form appId is still what the controller binds.
            (
                (RUN, FORM, "jobId=5&appId=1", Some("1")),
                (RUN, FORM, "jobId=5&appId=1", None),
            ),
            (
                ("/openApi/runWorkflow", FORM, "workflowId=7&appId=1", None),
                (
                    "/openApi/runWorkflow",
                    FORM,
                    "workflowId=07&appId=1&initParams=&delay=",
                    None,
                ),
            ),
            (
                (
                    "/openApi/retryInstance",
                    FORM,
                    "instanceId=16&appId=1",
                    None,
                ),
                (
                    "/openApi/retryInstance",
                    FORM,
                    "instanceId=0x10&appId=1&extra=1",
                    None,
                ),
            ),
            (
                (
                    "/openApi/retryWfInstance",
                    FORM,
                    "wfInstanceId=3&appId=1",
                    None,
                ),
                (
                    "/openApi/retryWfInstance",
                    FORM,
                    "wfInstanceId=%203%20&appId=%2B1",
                    None,
                ),
            ),
            // copyJob binds jobId only: the appId it is sent does not change what it copies.
            (
                ("/openApi/copyJob", FORM, "jobId=5&appId=1", Some("1")),
                ("/openApi/copyJob", FORM, "jobId=5&appId=2", Some("1")),
            ),
            (
                ("/openApi/copyWorkflow", FORM, "workflowId=5&appId=1", None),
                (
                    "/openApi/copyWorkflow",
                    FORM,
                    "workflowId=%235&appId=01",
                    None,
                ),
            ),
            // JSON endpoints read the body only: a query changes nothing.
            (
                (
                    "/openApi/saveJob",
                    JSON,
                    r#"{"appId":1,"jobName":"a"}"#,
                    None,
                ),
                (
                    "/openApi/saveJob?x=1",
                    JSON,
                    r#"{"jobName":"a","appId":1}"#,
                    None,
                ),
            ),
        ];
        let different: Vec<(Call, Call)> = vec![
            (run("jobId=5&appId=1"), run("jobId=6&appId=1")),
            // Long.valueOf("010") is 10, never octal 8; 0x10 is 16.
            (run("jobId=010&appId=1"), run("jobId=8&appId=1")),
            (run("jobId=0x10&appId=1"), run("jobId=10&appId=1")),
            // Values Spring cannot bind stay keyed by their text, apart from every number.
            (run("jobId=abc&appId=1"), run("jobId=5&appId=1")),
            (run("jobId=%2B0x5&appId=1"), run("jobId=5&appId=1")),
            (run("jobId=0x&appId=1"), run("jobId=0&appId=1")),
            (
                run("jobId=9223372036854775808&appId=1"),
                run("jobId=-9223372036854775808&appId=1"),
            ),
            (run("jobId=&appId=1"), run("jobId=0&appId=1")),
            (
                run("jobId=5&appId=1&delay=1"),
                run("jobId=5&appId=1&delay=0"),
            ),
            (
                run("jobId=5&appId=1&delay=-1"),
                run("jobId=5&appId=1&delay=0"),
            ),
            // instanceParams is a String: bound as sent, spaces included.
            (
                run("jobId=5&appId=1&instanceParams=x"),
                run("jobId=5&appId=1&instanceParams=%20x"),
            ),
            // No appId binds null (the controller fails); the header does not stand in for it.
            (
                (RUN, FORM, "jobId=5", Some("1")),
                (RUN, FORM, "jobId=5&appId=1", Some("1")),
            ),
            (
                (RUN, FORM, "jobId=5&appId=2", Some("1")),
                (RUN, FORM, "jobId=5&appId=1", Some("1")),
            ),
            // A JSON body on runJob is not bound: it must not count as the query would.
            (
                ("/openApi/runJob?appId=1", JSON, r#"{"jobId":5}"#, None),
                ("/openApi/runJob?appId=1&jobId=5", None, "", None),
            ),
            (
                ("/openApi/runWorkflow", FORM, "workflowId=7&appId=1", None),
                ("/openApi/runWorkflow", FORM, "workflowId=8&appId=1", None),
            ),
            (
                (
                    "/openApi/runWorkflow",
                    FORM,
                    "workflowId=7&appId=1&initParams=a",
                    None,
                ),
                (
                    "/openApi/runWorkflow",
                    FORM,
                    "workflowId=7&appId=1&initParams=b",
                    None,
                ),
            ),
            (
                ("/openApi/retryInstance", FORM, "instanceId=1&appId=1", None),
                ("/openApi/retryInstance", FORM, "instanceId=2&appId=1", None),
            ),
            (
                (
                    "/openApi/retryWfInstance",
                    FORM,
                    "wfInstanceId=1&appId=1",
                    None,
                ),
                (
                    "/openApi/retryWfInstance",
                    FORM,
                    "wfInstanceId=1&appId=2",
                    None,
                ),
            ),
            (
                ("/openApi/copyJob", FORM, "jobId=5&appId=1", None),
                ("/openApi/copyJob", FORM, "jobId=6&appId=1", None),
            ),
            // copyWorkflow binds appId: another app is another copy.
            (
                (
                    "/openApi/copyWorkflow",
                    FORM,
                    "workflowId=5&appId=1",
                    Some("1"),
                ),
                (
                    "/openApi/copyWorkflow",
                    FORM,
                    "workflowId=5&appId=2",
                    Some("1"),
                ),
            ),
            // saveJob reads its JSON body only: a query appId is not the body's appId.
            (
                ("/openApi/saveJob?appId=1", JSON, r#"{"jobName":"a"}"#, None),
                (
                    "/openApi/saveJob",
                    JSON,
                    r#"{"appId":1,"jobName":"a"}"#,
                    None,
                ),
            ),
            (
                ("/openApi/saveJob", JSON, r#"{"jobName":"a"}"#, Some("1")),
                (
                    "/openApi/saveJob",
                    JSON,
                    r#"{"appId":1,"jobName":"a"}"#,
                    Some("1"),
                ),
            ),
            // A form body on a JSON endpoint is not the JSON with the same members.
            (
                ("/openApi/saveJob", FORM, "appId=1&jobName=a", None),
                (
                    "/openApi/saveJob",
                    JSON,
                    r#"{"appId":1,"jobName":"a"}"#,
                    None,
                ),
            ),
            // Endpoints enabled in config keep text keying of every field.
            (
                ("/openApi/stopInstance", FORM, "instanceId=5&appId=1", None),
                ("/openApi/stopInstance", FORM, "instanceId=05&appId=1", None),
            ),
            (
                ("/openApi/stopInstance", FORM, "instanceId=5&appId=1", None),
                (
                    "/openApi/stopInstance",
                    FORM,
                    "instanceId=5&appId=1&x=1",
                    None,
                ),
            ),
        ];
        let mut failures = check_pairs(true, &same);
        failures.extend(check_pairs(false, &different));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn long_parameters_bind_as_spring_number_utils_reads_them() {
        let bound = [
            ("5", 5),
            ("05", 5),
            ("010", 10),
            ("+5", 5),
            ("-5", -5),
            (" 5 ", 5),
            ("1 2", 12),
            ("\t5\n", 5),
            ("\u{1F}5\u{3000}", 5),
            ("0x10", 16),
            ("0X1f", 31),
            ("#10", 16),
            ("-0x10", -16),
            ("-#10", -16),
            ("0x000000000000000000000001", 1),
            ("-0", 0),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
            ("0x7fffffffffffffff", i64::MAX),
            ("-0x8000000000000000", i64::MIN),
        ];
        for (text, n) in bound {
            assert_eq!(spring_long(text), Some(Some(n)), "{text:?}");
        }
        for blank in ["", " ", "\t\r\n", "\u{2028}\u{205F}"] {
            assert_eq!(spring_long(blank), Some(None), "{blank:?}");
        }
        let unbound = [
            "abc",
            "+0x5",
            "0x",
            "#",
            "-",
            "+",
            "--5",
            "-+5",
            "+-5",
            "0x-5",
            "#-5",
            "0x+5",
            "5.0",
            "1e3",
            "0x1g",
            "9223372036854775808",
            "-9223372036854775809",
            "0x8000000000000000",
            // No-break spaces are not Java whitespace; non-ASCII digits and U+180E are left to their text.
            "\u{a0}5",
            "5\u{202F}",
            "\u{665}",
            "5\u{180E}",
        ];
        for text in unbound {
            assert_eq!(spring_long(text), None, "{text:?}");
        }
        // A key is a fixed point: what it is made of reads back to itself, and text never reads as a number.
        let all = bound.iter().map(|(t, _)| *t).chain(unbound);
        for text in all {
            let once = canonical_long(text, "0");
            assert_eq!(canonical_long(&once, "0"), once, "{text:?}");
        }
    }

    #[test]
    fn the_path_prefix_scopes_the_key() {
        let body = "jobId=5&appId=1";
        let at = |path| (path, FORM, body, None);
        let same: Vec<(Call, Call)> = vec![
            (at("/pj/openApi/runJob"), at("/pj//openApi/runJob")),
            (at("/pj/openApi/runJob"), at("//pj/openApi/runJob/")),
            (at("/pj/openApi/runJob"), at("/pj/./openApi/runJob")),
            (at("/pj/openApi/runJob"), at("/x/../pj/openApi/runJob")),
            (at("/pj/openApi/runJob"), at("/%70j/openApi/runJob")),
            (
                at("/pj/openApi/runJob"),
                at("/pj/openApi/runJob;jsessionid=1"),
            ),
            (at("/pj/openApi/runJob"), at("/pj/%6FpenApi/run%4Aob")),
            (at("/a/b/openApi/runJob"), at("/a%2Fb/openApi/runJob")),
            (at("/openApi/runJob"), at("//openApi//runJob//")),
        ];
        let different: Vec<(Call, Call)> = vec![
            (
                at("/clusterA/openApi/runJob"),
                at("/clusterB/openApi/runJob"),
            ),
            (at("/openApi/runJob"), at("/pj/openApi/runJob")),
            (at("/a/openApi/runJob"), at("/a/b/openApi/runJob")),
            (at("/a/openApi/runJob"), at("/A/openApi/runJob")),
            (at("/ab/openApi/runJob"), at("/a/b/openApi/runJob")),
            // A path router may route on a segment's ;params, a backslash or a byte that is not UTF-8.
            (at("/a/openApi/runJob"), at("/a;v=2/openApi/runJob")),
            (at("/a/b/openApi/runJob"), at("/a%5Cb/openApi/runJob")),
            (at("/%FF/openApi/runJob"), at("/%FE/openApi/runJob")),
        ];
        let mut failures = check_pairs(true, &same);
        failures.extend(check_pairs(false, &different));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let ik = |path| {
            let prefix = crate::powerjob::served_prefix(path).unwrap();
            idempotency_key(&prefix, "runJob", "1", "k")
        };
        assert_ne!(
            ik("/clusterA/openApi/runJob"),
            ik("/clusterB/openApi/runJob")
        );
        assert_eq!(
            ik("/clusterA/openApi/runJob"),
            ik("/clusterA//openApi/runJob/")
        );
    }

    #[test]
    fn a_save_names_an_existing_record_only_when_jackson_binds_a_non_null_id() {
        let updates = [
            r#"{"id":3}"#,
            r#"{"id":-3}"#,
            r#"{"id":"3"}"#,
            r#"{"id":" 3 "}"#,
            r#"{"id":"+3"}"#,
            r#"{"id":"007"}"#,
            r#"{"id":5.0}"#,
            r#"{"id":0.5}"#,
            r#"{"id":9223372036854775807}"#,
            r#"{"id":"-9223372036854775808"}"#,
            r#"{"id":null,"id":4}"#,
            r#"[{"id":1},{"id":"2"}]"#,
        ];
        let creates_or_refused = [
            r#"{"jobName":"a"}"#,
            r#"{"id":null}"#,
            r#"{"id":""}"#,
            r#"{"id":" "}"#,
            r#"{"id":"\t"}"#,
            r#"{"id":"null"}"#,
            r#"{"id":" null "}"#,
            r#"{"id":4,"id":null}"#,
            r#"{"ID":4}"#,
            // Jackson refuses these (nothing is created); guarding them is the safe side.
            r#"{"id":"abc"}"#,
            r#"{"id":"0x5"}"#,
            r#"{"id":"5.0"}"#,
            r#"{"id":"NULL"}"#,
            r#"{"id":true}"#,
            r#"{"id":[]}"#,
            r#"{"id":[5]}"#,
            r#"{"id":{}}"#,
            r#"{"id":9223372036854775808}"#,
            r#"{"id":"9223372036854775808"}"#,
            r#"{"id":1e30}"#,
            "[]",
            r#"[{"id":1},{"id":""}]"#,
            r#"[{"id":1},{"nodeName":"x"}]"#,
            r#"[{"id":1},null]"#,
            "not JSON",
        ];
        let mut failures: Vec<String> = updates
            .iter()
            .filter(|body| !names_existing_record(body.as_bytes()))
            .map(|body| format!("{body} is an update, yet guarded as a create"))
            .collect();
        failures.extend(
            creates_or_refused
                .iter()
                .filter(|body| names_existing_record(body.as_bytes()))
                .map(|body| format!("{body} creates (or fails), yet passes as an update")),
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_fields_setting_selects_among_bound_and_named_fields() {
        let only_job = vec!["jobId".to_string()];
        let traced = vec!["jobId".to_string(), "trace".to_string()];
        let k = |body: &str, selected: &[String]| {
            key_at("/openApi/runJob", FORM, body, None, Some(selected)).unwrap()
        };
        assert_eq!(
            k("jobId=05&appId=1&delay=1", &only_job),
            k("jobId=5&appId=1&delay=2", &only_job)
        );
        // A field named in the setting counts even when runJob does not bind it (a newer server might).
        assert_ne!(
            k("jobId=5&appId=1&trace=a", &traced),
            k("jobId=5&appId=1&trace=b", &traced)
        );
    }

    #[test]
    fn duplicates_are_refused_only_where_they_are_read() {
        let read = |target: &str, body: &str| key_at(target, FORM, body, None, None);
        assert!(read("/openApi/runJob", "jobId=5&appId=1&jobId=6").is_err());
        assert!(read("/openApi/runJob?appId=1", "jobId=5&appId=1").is_err());
        assert!(read("/openApi/copyJob", "jobId=5&appId=1&appId=2").is_err());
        // Not bound by runJob: the server ignores it, given once or twice.
        assert_eq!(
            read("/openApi/runJob", "jobId=5&appId=1&foo=1&foo=2").unwrap(),
            read("/openApi/runJob", "jobId=5&appId=1").unwrap()
        );
        // Still strict about what cannot be decoded, bound or not.
        assert!(read("/openApi/runJob", "jobId=5&appId=1&foo=%zz").is_err());
        // Undertow parses a body only under the exact lowercase form type: another case would not be read.
        assert!(matches!(
            key_at(
                "/openApi/runJob",
                Some("Application/X-WWW-Form-Urlencoded"),
                "jobId=5&appId=1",
                None,
                None
            ),
            Err(BadPayload::MediaType { .. })
        ));
        // Neither form nor JSON on a @RequestParam endpoint: refused as before.
        assert!(matches!(
            key_at(
                "/openApi/runJob",
                Some("text/plain"),
                "jobId=5&appId=1",
                None,
                None
            ),
            Err(BadPayload::MediaType { .. })
        ));
        assert!(matches!(
            key_at(
                "/openApi/runJob",
                Some("multipart/related; type=application/json"),
                "--x--",
                None,
                None
            ),
            Err(BadPayload::MediaType { .. })
        ));
    }

    #[test]
    fn field_digests_are_what_serde_json_writes() {
        let serde = |payload: &Payload| {
            let map: serde_json::Map<String, Value> = payload
                .fields
                .iter()
                .map(|(name, value)| {
                    let digest = hex(&Sha256::digest(value.as_bytes()));
                    (name.clone(), Value::String(digest[..16].to_string()))
                })
                .collect();
            Value::Object(map).to_string()
        };
        let names = [
            "",
            "\u{0}body",
            "a\"b",
            "back\\slash",
            "tab\t",
            "é",
            "Z",
            "appId",
            "jobId",
            "zz",
        ];
        let mut fields: Vec<(String, String)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), format!("value {i}")))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        for n in 0..=fields.len() {
            let payload = Payload {
                principal: String::new(),
                fields: fields[..n].to_vec(),
                json: false,
            };
            assert_eq!(field_digests(&payload), serde(&payload), "{n} fields");
        }
        let run = payload(
            "runJob",
            FORM,
            None,
            b"jobId=5&appId=1&delay=07",
            None,
            None,
        )
        .unwrap();
        assert_eq!(field_digests(&run), serde(&run));
    }

    #[test]
    fn the_plain_decimal_shortcut_keys_as_spring_binds() {
        let by_spring = |text: &str| match spring_long(text) {
            Some(Some(n)) => n.to_string(),
            Some(None) => String::new(),
            None => text.to_string(),
        };
        for text in [
            "0",
            "7",
            "10",
            "00",
            "01",
            "123456789012345678",
            "999999999999999999",
            "9223372036854775807",
            "9223372036854775808",
            "0000000000000000001",
            "+5",
            "-0",
            " 5",
            "",
            "5a",
        ] {
            assert_eq!(canonical_long(text, ""), by_spring(text), "{text:?}");
            assert_eq!(
                canonical_long_owned(text.to_string(), ""),
                by_spring(text),
                "{text:?}"
            );
        }
    }
}
