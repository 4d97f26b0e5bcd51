//! Backend-reported load: parsers of load reports and `Retry-After`, and the cost a report gives a peer.
//!
//! Every parser takes a byte slice as it came off the wire, reads at most [`MAX_REPORT_LEN`] bytes of it, allocates
//! nothing, never panics, and runs in time linear in its input (each step consumes at least one byte; nesting is
//! bounded by [`MAX_DEPTH`]). A header that does not parse is an error value, never a failure of the request.
//!
//! Formats read:
//! - ORCA's `endpoint-load-metrics` response header (as Envoy and gRPC read it), in its TEXT form
//!   (`TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue=4`) and its JSON form
//!   (`JSON {"cpu_utilization":0.3,"named_metrics":{"queue":4}}`); the BIN (protobuf) form is refused;
//! - a plain value (`X-Load: 0.73`, or `73%`);
//! - `Retry-After` in delta seconds (an HTTP date is refused);
//! - an agent answer (HAProxy's agent-check words): `up`, `drain`, `maint`, `NN%`, space- or comma-separated.
//!
//! ## Cost with reports
//! A peer's reported load `u` is its ORCA utilization — `application_utilization` when above 0, else
//! `cpu_utilization`, plus `eps / rps_fractional × error_utilization_penalty` when `rps_fractional` is above 0 (the
//! terms of Envoy's client-side weighted round robin, whose weight is `rps / u`) — or the value of the named metric
//! or plain header configured. With reports on, the load cost of a peer becomes
//!
//! ```text
//! cost = (est × (1 + in_flight) + baseline × scale × u) / weight        (× backpressure_penalty while backing off)
//! ```
//!
//! where `est` is the peer's peak-EWMA latency estimate and `baseline` the upstream's (the lower median of its
//! healthy peers' estimates; the peer's own `est` while there is none). The reported term is priced at the
//! baseline rather than at the peer's own estimate: a peak-EWMA estimate follows a peer's latency peaks, and a
//! backend with little capacity has the wider spread of latencies (few requests in flight, each a big step of its
//! utilization), so its estimate would tax its reports and push it below its capacity share. A report is used from `blackout` after the first report of a
//! sequence (Envoy's `blackout_period`, 10 s) until `expiry` after the last one (Envoy's
//! `weight_expiration_period`, 3 min); a peer without a usable report counts with the mean `u` of the upstream's
//! peers that have one. While no peer of the upstream has a usable report, the cost is the plain one
//! (`est × (1 + in_flight) / weight`).
//!
//! Why this shape: `u` is the backend's load per capacity, `in_flight` the gateway's load in requests. P2C evens
//! out costs; with `scale × u` dominating, it evens out utilization, so each backend gets traffic in proportion to
//! its capacity. With the default scale of 100, a backend of capacity 4 beside three of capacity 8, all at 70 %,
//! settles at 14.7 % of the traffic for a capacity share of 14.3 % (the `in_flight` term, kept so that a burst
//! between two reports spreads out, moves the balance by `c / (scale + c)`). Without reports the same upstream
//! sends the weak backend the share that evens out `in_flight`, about a quarter.

/// Bytes of a header read at most; a longer one is refused whole.
pub const MAX_REPORT_LEN: usize = 4096;
/// Nesting depth of JSON read at most.
pub const MAX_DEPTH: usize = 8;
/// Largest value accepted in a report.
pub const MAX_VALUE: f64 = 1e12;

/// Why a header was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportError {
    /// Nothing but blanks.
    Empty,
    /// Longer than [`MAX_REPORT_LEN`].
    TooLong,
    /// An ORCA header in a format not read here (BIN) or without a format word.
    Format,
    /// Not well formed.
    Syntax,
    /// A value negative, not finite or above [`MAX_VALUE`].
    Value,
}

/// The fields of an ORCA load report read here (0 when absent; `named` is the named metric asked for).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OrcaReport {
    pub cpu_utilization: f64,
    pub application_utilization: f64,
    pub mem_utilization: f64,
    pub rps_fractional: f64,
    pub eps: f64,
    pub named: Option<f64>,
}

impl OrcaReport {
    /// Envoy's utilization of a report: `application_utilization` when above 0, else `cpu_utilization`, plus
    /// `eps / rps_fractional × error_penalty` when `rps_fractional` is above 0.
    pub fn utilization(&self, error_penalty: f64) -> f64 {
        let u = if self.application_utilization > 0.0 { self.application_utilization } else { self.cpu_utilization };
        let errors = if self.rps_fractional > 0.0 { self.eps / self.rps_fractional * error_penalty } else { 0.0 };
        let v = u + errors;
        if v.is_finite() { v.min(MAX_VALUE) } else { MAX_VALUE }
    }
}

/// An agent's answer: the state it asks for and the weight percentage it gives, each when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AgentAnswer {
    pub state: Option<AgentState>,
    /// Weight in percent of the configured weight (0 to 1000).
    pub weight_percent: Option<u32>,
}

/// The states an agent can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AgentState {
    /// Back in service (undoes `drain` and `maint`).
    Up = 1,
    /// No new requests; those in flight finish.
    Drain = 2,
    /// Out of service (maintenance): no request at all.
    Maint = 3,
}

#[inline]
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_blank(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_blank(b)).map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

fn bounded(input: &[u8]) -> Result<&[u8], ReportError> {
    if input.len() > MAX_REPORT_LEN {
        return Err(ReportError::TooLong);
    }
    let s = trim(input);
    if s.is_empty() {
        return Err(ReportError::Empty);
    }
    Ok(s)
}

/// A number as JSON or ORCA TEXT writes it (no allocation: the slice is parsed in place), checked to lie in
/// `0..=MAX_VALUE`.
fn number(s: &[u8]) -> Result<f64, ReportError> {
    if s.is_empty() || s.len() > 64 || !s.iter().all(|b| matches!(b, b'0'..=b'9' | b'.' | b'-' | b'+' | b'e' | b'E')) {
        return Err(ReportError::Syntax);
    }
    let text = std::str::from_utf8(s).map_err(|_| ReportError::Syntax)?;
    let v: f64 = text.parse().map_err(|_| ReportError::Syntax)?;
    if !v.is_finite() || !(0.0..=MAX_VALUE).contains(&v) {
        return Err(ReportError::Value);
    }
    Ok(v)
}

fn assign(r: &mut OrcaReport, key: &[u8], named: &[u8], v: f64) {
    match key {
        b"cpu_utilization" => r.cpu_utilization = v,
        b"application_utilization" => r.application_utilization = v,
        b"mem_utilization" => r.mem_utilization = v,
        b"rps_fractional" => r.rps_fractional = v,
        b"eps" => r.eps = v,
        _ => {
            if !named.is_empty() {
                if let Some(name) = key.strip_prefix(b"named_metrics.") {
                    if name == named {
                        r.named = Some(v);
                    }
                }
            }
        }
    }
}

/// Parses an ORCA `endpoint-load-metrics` header value (TEXT or JSON form); `named` is the named metric to pick
/// (empty: none).
///
/// # Errors
/// [`ReportError`] for an empty, overlong, BIN or malformed header; nothing of a malformed header is used.
pub fn parse_orca(input: &[u8], named: &[u8]) -> Result<OrcaReport, ReportError> {
    let s = bounded(input)?;
    let split = s.iter().position(|&b| is_blank(b)).unwrap_or(s.len());
    let (word, rest) = s.split_at(split);
    let rest = trim(rest);
    if word.eq_ignore_ascii_case(b"TEXT") {
        parse_orca_text(rest, named)
    } else if word.eq_ignore_ascii_case(b"JSON") {
        parse_orca_json(rest, named)
    } else {
        Err(ReportError::Format)
    }
}

fn parse_orca_text(s: &[u8], named: &[u8]) -> Result<OrcaReport, ReportError> {
    let mut r = OrcaReport::default();
    if s.is_empty() {
        return Err(ReportError::Empty);
    }
    for item in s.split(|&b| b == b',') {
        let item = trim(item);
        if item.is_empty() {
            return Err(ReportError::Syntax);
        }
        let eq = item.iter().position(|&b| b == b'=').ok_or(ReportError::Syntax)?;
        let key = trim(&item[..eq]);
        if key.is_empty() || !key.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(ReportError::Syntax);
        }
        let v = number(trim(&item[eq + 1..]))?;
        assign(&mut r, key, named, v);
    }
    Ok(r)
}

/// A JSON reader over a byte slice: just enough for ORCA's flat object with `named_metrics`-like maps.
struct Json<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Json<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && is_blank(self.s[self.i]) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> Result<(), ReportError> {
        self.ws();
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(ReportError::Syntax)
        }
    }

    /// A string's raw bytes between its quotes (escapes left as they are: a key with escapes matches nothing).
    fn string(&mut self) -> Result<&'a [u8], ReportError> {
        self.eat(b'"')?;
        let start = self.i;
        while let Some(b) = self.peek() {
            match b {
                b'"' => {
                    let out = &self.s[start..self.i];
                    self.i += 1;
                    return Ok(out);
                }
                b'\\' => self.i += 2,
                0..=0x1f => return Err(ReportError::Syntax),
                _ => self.i += 1,
            }
        }
        Err(ReportError::Syntax)
    }

    fn number(&mut self) -> Result<f64, ReportError> {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9' | b'.' | b'-' | b'+' | b'e' | b'E')) {
            self.i += 1;
        }
        number(&self.s[start..self.i])
    }

    fn word(&mut self, w: &[u8]) -> Result<(), ReportError> {
        if self.s[self.i..].starts_with(w) {
            self.i += w.len();
            Ok(())
        } else {
            Err(ReportError::Syntax)
        }
    }

    /// Skips any value (bounded depth).
    fn skip(&mut self, depth: usize) -> Result<(), ReportError> {
        if depth > MAX_DEPTH {
            return Err(ReportError::Syntax);
        }
        self.ws();
        match self.peek() {
            Some(b'"') => self.string().map(drop),
            Some(b'{') => self.members(depth, |_, _, _| Ok(())),
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return Err(ReportError::Syntax),
                    }
                }
            }
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            Some(b'-' | b'0'..=b'9') => {
                // Any number is skipped, even one a report would refuse (a negative one in an unknown field).
                while matches!(self.peek(), Some(b'0'..=b'9' | b'.' | b'-' | b'+' | b'e' | b'E')) {
                    self.i += 1;
                }
                Ok(())
            }
            _ => Err(ReportError::Syntax),
        }
    }

    /// Reads an object's members, calling `f(self, key, depth)` with the reader positioned before each value; `f`
    /// either consumes the value or returns without moving, and then the value is skipped.
    fn members(
        &mut self,
        depth: usize,
        mut f: impl FnMut(&mut Self, &'a [u8], usize) -> Result<(), ReportError>,
    ) -> Result<(), ReportError> {
        if depth > MAX_DEPTH {
            return Err(ReportError::Syntax);
        }
        self.eat(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let key = self.string()?;
            self.eat(b':')?;
            self.ws();
            let before = self.i;
            f(self, key, depth)?;
            if self.i == before {
                self.skip(depth + 1)?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(ReportError::Syntax),
            }
        }
    }
}

fn parse_orca_json(s: &[u8], named: &[u8]) -> Result<OrcaReport, ReportError> {
    let mut r = OrcaReport::default();
    let mut p = Json { s, i: 0 };
    p.members(0, |p, key, depth| {
        match key {
            b"cpu_utilization" | b"application_utilization" | b"mem_utilization" | b"rps_fractional" | b"eps" => {
                let v = p.number()?;
                assign(&mut r, key, named, v);
            }
            b"named_metrics" if p.peek() == Some(b'{') => {
                p.members(depth + 1, |p, name, _| {
                    if !named.is_empty() && name == named && matches!(p.peek(), Some(b'0'..=b'9' | b'-')) {
                        r.named = Some(p.number()?);
                    }
                    Ok(())
                })?;
            }
            _ => {}
        }
        Ok(())
    })?;
    p.ws();
    if p.i != s.len() {
        return Err(ReportError::Syntax);
    }
    Ok(r)
}

/// Largest polled body read.
pub const MAX_BODY_LEN: usize = 65536;

/// Reads the number at `path` (dot-separated keys of nested objects, e.g. `load.queue`) of a JSON document.
///
/// # Errors
/// [`ReportError`] when the body is overlong or malformed, or the field is missing or not a number in range.
pub fn parse_json_field(body: &[u8], path: &[u8]) -> Result<f64, ReportError> {
    if body.len() > MAX_BODY_LEN {
        return Err(ReportError::TooLong);
    }
    let s = trim(body);
    if s.is_empty() || path.is_empty() {
        return Err(ReportError::Empty);
    }
    let mut p = Json { s, i: 0 };
    let mut found = None;
    json_find(&mut p, path, 0, &mut found)?;
    p.ws();
    if p.i != s.len() {
        return Err(ReportError::Syntax);
    }
    found.ok_or(ReportError::Syntax)?
}

fn json_find(p: &mut Json<'_>, path: &[u8], depth: usize, found: &mut Option<Result<f64, ReportError>>) -> Result<(), ReportError> {
    let (head, rest) = match path.iter().position(|&b| b == b'.') {
        Some(dot) => (&path[..dot], Some(&path[dot + 1..])),
        None => (path, None),
    };
    p.members(depth, |p, key, depth| {
        if key != head || found.is_some() {
            return Ok(());
        }
        match rest {
            Some(rest) if p.peek() == Some(b'{') => json_find(p, rest, depth + 1, found),
            Some(_) => Ok(()),
            None if matches!(p.peek(), Some(b'0'..=b'9' | b'-')) => {
                *found = Some(p.number());
                Ok(())
            }
            None => {
                *found = Some(Err(ReportError::Value));
                Ok(())
            }
        }
    })
}

/// Reads the first sample of `metric` in a Prometheus text exposition (`queue_depth 4`, `queue_depth{pool="a"} 4`;
/// comments and other metrics skipped).
///
/// # Errors
/// [`ReportError`] when the body is overlong, the metric is missing, or its value is not a number in range.
pub fn parse_prometheus(body: &[u8], metric: &[u8]) -> Result<f64, ReportError> {
    if body.len() > MAX_BODY_LEN {
        return Err(ReportError::TooLong);
    }
    if metric.is_empty() {
        return Err(ReportError::Empty);
    }
    for line in body.split(|&b| b == b'\n') {
        let line = trim(line);
        let Some(rest) = line.strip_prefix(metric) else { continue };
        let rest = match rest.first() {
            Some(b'{') => match rest.iter().position(|&b| b == b'}') {
                Some(end) => &rest[end + 1..],
                None => return Err(ReportError::Syntax),
            },
            Some(b' ' | b'\t') => rest,
            _ => continue, // another metric whose name begins with this one
        };
        let rest = trim(rest);
        let value = rest.split(|&b| is_blank(b)).next().unwrap_or(b"");
        return number(value);
    }
    Err(ReportError::Syntax)
}

/// Parses a plain load value: a number (`0.73`) or a percentage (`73%`, read as 0.73).
///
/// # Errors
/// [`ReportError`] for anything else.
pub fn parse_value(input: &[u8]) -> Result<f64, ReportError> {
    let s = bounded(input)?;
    match s.strip_suffix(b"%") {
        Some(p) => Ok(number(trim(p))? / 100.0),
        None => number(s),
    }
}

/// Parses `Retry-After` in delta seconds (`2`); `None` for anything else (an HTTP date, a negative number,
/// more than 9 digits).
pub fn parse_retry_after(input: &[u8]) -> Option<u64> {
    let s = trim(&input[..input.len().min(64)]);
    if s.is_empty() || s.len() > 9 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |acc, &d| acc * 10 + (d - b'0') as u64))
}

/// Parses an agent's answer: words separated by blanks or commas; `up` / `ready`, `drain`, `maint` / `down` /
/// `stopped` / `fail` set the state; `NN%` sets the weight; other words are ignored (HAProxy's agent-check words).
///
/// # Errors
/// [`ReportError`] when the answer is empty, overlong, has a malformed percentage, or says nothing known.
pub fn parse_agent(input: &[u8]) -> Result<AgentAnswer, ReportError> {
    let s = bounded(input)?;
    let mut a = AgentAnswer::default();
    for w in s.split(|&b| is_blank(b) || b == b',').filter(|w| !w.is_empty()) {
        if let Some(p) = w.strip_suffix(b"%") {
            if p.is_empty() || p.len() > 4 || !p.iter().all(u8::is_ascii_digit) {
                return Err(ReportError::Syntax);
            }
            let v = p.iter().fold(0u32, |acc, &d| acc * 10 + (d - b'0') as u32);
            if v > 1000 {
                return Err(ReportError::Value);
            }
            a.weight_percent = Some(v);
        } else if w.eq_ignore_ascii_case(b"up") || w.eq_ignore_ascii_case(b"ready") {
            a.state = Some(AgentState::Up);
        } else if w.eq_ignore_ascii_case(b"drain") {
            a.state = Some(AgentState::Drain);
        } else if w.eq_ignore_ascii_case(b"maint")
            || w.eq_ignore_ascii_case(b"down")
            || w.eq_ignore_ascii_case(b"stopped")
            || w.eq_ignore_ascii_case(b"fail")
        {
            a.state = Some(AgentState::Maint);
        }
    }
    if a.state.is_none() && a.weight_percent.is_none() {
        return Err(ReportError::Syntax);
    }
    Ok(a)
}

/// How an upstream reads and uses reports (kept in its shared record; see `engine`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportParams {
    /// Reports enter the cost.
    pub enabled: bool,
    /// `Retry-After` on 429/503 raises the cost for its time.
    pub backpressure: bool,
    pub blackout_us: u64,
    pub expiry_us: u64,
    /// Longest back-off taken from one `Retry-After`.
    pub backpressure_max_us: u64,
    /// Cost multiplier while backing off.
    pub backpressure_penalty: f64,
    /// Weight of the reported load in in-flight requests (see the module text).
    pub scale: f64,
    /// Time constant of the smoothing of a peer's reports (0: the last report as it is).
    pub smoothing_us: u64,
}

impl Default for ReportParams {
    fn default() -> Self {
        ReportParams {
            enabled: false,
            backpressure: false,
            blackout_us: 10_000_000,
            expiry_us: 180_000_000,
            backpressure_max_us: 1_000_000,
            backpressure_penalty: 1000.0,
            scale: 100.0,
            smoothing_us: 500_000,
        }
    }
}

/// A time-weighted moving average of reports: `prev + (1 − e^(−dt/τ)) × (new − prev)`. One report is a sample of
/// a backend's load at one instant; a backend of little capacity, with few requests in flight, reports in big
/// steps (¼ of its utilization per request for a capacity of 4), and P2C over such noisy costs drifts toward equal
/// shares. Averaging over τ (0.5 s by default; reports of a busy backend arrive every few milliseconds) takes the
/// noise out at the price of that much lag. Two workers storing at once lose one of the two reports, nothing more.
#[inline]
pub fn smooth(prev: f64, new: f64, dt_us: u64, tau_us: u64) -> f64 {
    if tau_us == 0 || !prev.is_finite() {
        return new;
    }
    let a = 1.0 - (-(dt_us as f64) / tau_us as f64).exp();
    prev + a * (new - prev)
}

/// A report `age_us` old, moved toward the upstream mean by its age: `u + (mean − u) × min(1, age / τ)`. A peer
/// whose last report is high loses every comparison, gets no request, and so no newer report: without this its old
/// report would keep it out until it expires. One smoothing time constant after its last report it counts as
/// average, takes requests again and reports anew. For a peer with traffic (reports every few ms) it changes
/// nothing noticeable.
#[inline]
pub fn aged(u: f64, mean: f64, age_us: u64, tau_us: f64) -> f64 {
    if tau_us <= 0.0 {
        return u;
    }
    u + (mean - u) * (age_us as f64 / tau_us).min(1.0)
}

/// Whether a report first seen at `since_us` and last at `last_us` is usable at `now_us` (past the blackout, before
/// the expiry). A peer that never reported (`last_us` 0) has none.
#[inline]
pub fn usable(since_us: u64, last_us: u64, now_us: u64, blackout_us: u64, expiry_us: u64) -> bool {
    last_us != 0 && now_us.saturating_sub(last_us) < expiry_us && now_us.saturating_sub(since_us) >= blackout_us
}

/// The load cost with reports (see the module text): `(est × (1 + in_flight) + baseline × scale × u) / weight`.
#[inline]
pub fn reported_cost(est: f64, inflight: f64, baseline: f64, weight: f64, scale: f64, u: f64) -> f64 {
    (est * (1.0 + inflight) + baseline * scale * u) / weight.max(1.0)
}

// ----- in the shared region -----

use crate::layout::{PeerHead, Region, UpstreamHead};
use std::sync::atomic::Ordering::*;

/// Bits of `UpstreamHead::report_flags`.
pub mod flag {
    /// Reports enter the cost.
    pub const COST: u32 = 1;
    /// `Retry-After` on 429/503 raises the cost for its time.
    pub const BACKPRESSURE: u32 = 2;
    /// The agent's weight percentage enters the cost.
    pub const AGENT: u32 = 4;
}

/// What a report header holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ReportKind {
    /// ORCA `endpoint-load-metrics`; the load is its utilization.
    OrcaUtilization = 0,
    /// ORCA `endpoint-load-metrics`; the load is the named metric.
    OrcaNamed = 1,
    /// A plain number or percentage.
    Value = 2,
}

/// How an upstream reads reports: the parameters, what the header holds, and the named metric (at most 63 bytes).
#[derive(Debug, Clone, Copy)]
pub struct ReportConfig<'a> {
    pub params: ReportParams,
    pub agent: bool,
    pub kind: ReportKind,
    pub named: &'a [u8],
    pub error_penalty: f64,
}

/// What [`Region::take_report`] did with a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Taken {
    /// A report was stored.
    pub report: bool,
    /// The header was there but refused (counted).
    pub malformed: bool,
    /// The response was back-pressure: the peer backs off, and the response is no failure of the peer.
    pub backpressure: bool,
}

/// The reported values of a peer, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PeerReport {
    /// The load the cost uses (NaN: never reported).
    pub load: f64,
    /// cpu, application, rps, eps, named (NaN when absent).
    pub fields: [f64; 5],
    /// Age of the last report (µs; `u64::MAX` when none).
    pub age_us: u64,
    /// The report is used now (past the blackout, not expired).
    pub usable: bool,
    /// Back-off left (µs).
    pub backoff_us: u64,
    pub reports: u64,
    pub malformed: u64,
    pub backpressure: u64,
    pub agent_state: u32,
    pub agent_weight: u32,
}

/// What the request path reads of an upstream's report settings, once per pick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReportView {
    pub flags: u32,
    pub mean: f64,
    pub scale: f64,
    pub blackout_us: u64,
    pub expiry_us: u64,
    pub penalty: f64,
    /// The upstream's latency baseline (µs; 0 while unknown), see `engine::Region::update_baseline`.
    pub baseline: f64,
    /// Smoothing time constant (µs, as f64; 0: off).
    pub smoothing_us: f64,
}

impl ReportView {
    pub const OFF: ReportView =
        ReportView { flags: 0, mean: -1.0, scale: 0.0, blackout_us: 0, expiry_us: 0, penalty: 1.0, baseline: 0.0, smoothing_us: 0.0 };

    /// One load when reports are off.
    #[inline(always)]
    pub fn read(h: &UpstreamHead) -> ReportView {
        let flags = h.report_flags.load(Relaxed);
        if flags == 0 {
            return Self::OFF;
        }
        Self::read_on(h, flags)
    }

    #[inline(never)]
    fn read_on(h: &UpstreamHead, flags: u32) -> ReportView {
        ReportView {
            flags,
            mean: f64::from_bits(h.report_mean.load(Relaxed)),
            scale: f64::from_bits(h.report_scale.load(Relaxed)),
            blackout_us: h.report_blackout_us.load(Relaxed),
            expiry_us: h.report_expiry_us.load(Relaxed),
            penalty: f64::from_bits(h.backpressure_penalty.load(Relaxed)),
            baseline: f64::from_bits(h.baseline_us.load(Relaxed)),
            smoothing_us: h.report_smoothing_us.load(Relaxed) as f64,
        }
    }

    /// The cost of a peer with reports on (see the module text); `plain` is its cost without them, `est` and
    /// `inflight` what that cost was made of, `slow` its slow-peer multiplier (1 when not slow).
    #[inline(never)]
    pub fn cost(&self, h: &PeerHead, est: f64, inflight: f64, slow: f64, plain: f64, now_us: u64) -> f64 {
        let mut weight = h.weight.load(Relaxed).max(1) as f64;
        if self.flags & flag::AGENT != 0 {
            let pct = h.agent_weight.load(Relaxed);
            if pct > 0 {
                weight *= pct as f64 / 100.0;
            }
        }
        let mut cost = if self.flags & flag::COST != 0 && self.mean >= 0.0 {
            let since = h.report_since_us.load(Relaxed);
            let last = h.report_us.load(Relaxed);
            let u = if usable(since, last, now_us, self.blackout_us, self.expiry_us) {
                aged(f64::from_bits(h.report_load.load(Relaxed)), self.mean, now_us.saturating_sub(last), self.smoothing_us)
            } else {
                self.mean
            };
            let base = if self.baseline > 0.0 { self.baseline } else { est };
            reported_cost(est, inflight, base, 1.0, self.scale, u) / weight.max(0.01) * slow
        } else if self.flags & flag::AGENT != 0 {
            est * (1.0 + inflight) / weight.max(0.01) * slow
        } else {
            plain
        };
        if self.flags & flag::BACKPRESSURE != 0 && h.backoff_until_us.load(Relaxed) > now_us {
            cost *= self.penalty;
        }
        cost
    }
}

/// What a polled endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum PollFormat {
    /// Agent words (`up`, `drain`, `maint`, `NN%`).
    Agent = 0,
    /// A JSON document; the load is a field of it.
    Json = 1,
    /// Prometheus text; the load is a metric's first sample.
    Prometheus = 2,
}

/// Stores a report's fields and its load in a peer record, the load smoothed over time (see [`smooth`]); a report
/// after an expired one begins a new sequence (and its blackout).
fn store(h: &PeerHead, uh: &UpstreamHead, load: f64, fields: [f64; 5], now_us: u64) {
    for (w, v) in h.report_fields.iter().zip(fields) {
        w.store(v.to_bits(), Relaxed);
    }
    let last = h.report_us.load(Relaxed);
    let fresh = last == 0 || now_us.saturating_sub(last) >= uh.report_expiry_us.load(Relaxed);
    let value = if fresh {
        load
    } else {
        let prev = f64::from_bits(h.report_load.load(Relaxed));
        smooth(prev, load, now_us.saturating_sub(last), uh.report_smoothing_us.load(Relaxed))
    };
    h.report_load.store(value.to_bits(), Relaxed);
    if fresh {
        h.report_since_us.store(now_us, Relaxed);
    }
    h.report_us.store(now_us, Release);
    h.reports_total.fetch_add(1, Relaxed);
}

impl Region {
    /// Sets how upstream `idx` reads and uses reports (`None`: off).
    pub fn configure_reports(&self, idx: u32, conf: Option<&ReportConfig<'_>>) {
        if idx >= self.params().max_upstreams {
            return;
        }
        let h = self.upstream(idx).head;
        let Some(c) = conf else {
            h.report_flags.store(0, Relaxed);
            return;
        };
        let p = &c.params;
        h.report_kind.store(c.kind as u32, Relaxed);
        h.report_blackout_us.store(p.blackout_us, Relaxed);
        h.report_expiry_us.store(p.expiry_us.max(1), Relaxed);
        h.backpressure_max_us.store(p.backpressure_max_us, Relaxed);
        h.backpressure_penalty.store(p.backpressure_penalty.max(1.0).to_bits(), Relaxed);
        h.report_scale.store(p.scale.max(0.0).to_bits(), Relaxed);
        h.report_error_penalty.store(c.error_penalty.max(0.0).to_bits(), Relaxed);
        h.report_smoothing_us.store(p.smoothing_us, Relaxed);
        h.report_named.store(c.named);
        h.report_mean.store((-1.0f64).to_bits(), Relaxed);
        let flags = (p.enabled as u32 * flag::COST) | (p.backpressure as u32 * flag::BACKPRESSURE) | (c.agent as u32 * flag::AGENT);
        h.report_flags.store(flags, Release);
    }

    /// Takes what the response of an attempt on peer record `slot` (generation `gen`) reports: its load `header`
    /// (empty when the response had none) and, for a 429 or 503, its `Retry-After`.
    pub fn take_report(&self, slot: u32, gen: u32, status: u32, header: &[u8], retry_after: &[u8], now_us: u64) -> Taken {
        let mut taken = Taken::default();
        if slot >= self.params().max_peers {
            return taken;
        }
        let h = self.peer_head(slot);
        if h.gen.load(Acquire) != gen {
            return taken;
        }
        let up = h.upstream.load(Relaxed);
        if up >= self.params().max_upstreams {
            return taken;
        }
        let uh = self.upstream(up).head;
        let flags = uh.report_flags.load(Acquire);
        if flags & flag::BACKPRESSURE != 0 && (status == 429 || status == 503) {
            if let Some(secs) = parse_retry_after(retry_after) {
                let max = uh.backpressure_max_us.load(Relaxed);
                let until = now_us + secs.saturating_mul(1_000_000).min(max);
                if until > now_us {
                    h.backoff_until_us.fetch_max(until, Relaxed);
                    h.backpressure_total.fetch_add(1, Relaxed);
                    taken.backpressure = true;
                }
            }
        }
        if flags & flag::COST == 0 || header.is_empty() {
            return taken;
        }
        let mut fields = [f64::NAN; 5];
        let load = match uh.report_kind.load(Relaxed) {
            2 => parse_value(header).inspect(|&v| fields[4] = v),
            kind => {
                let mut name = [0u8; 64];
                let n = uh.report_named.load(&mut name);
                parse_orca(header, &name[..n]).and_then(|r| {
                    fields = [r.cpu_utilization, r.application_utilization, r.rps_fractional, r.eps, r.named.unwrap_or(f64::NAN)];
                    if kind == 1 {
                        r.named.ok_or(ReportError::Syntax)
                    } else {
                        Ok(r.utilization(f64::from_bits(uh.report_error_penalty.load(Relaxed))))
                    }
                })
            }
        };
        let Ok(load) = load else {
            h.reports_malformed.fetch_add(1, Relaxed);
            taken.malformed = true;
            return taken;
        };
        store(h, uh, load, fields, now_us);
        taken.report = true;
        taken
    }

    /// Takes a polled answer for peer record `slot` (generation `gen`): an agent's words, or a load value read from
    /// a JSON field or Prometheus metric named `field`. Returns the agent's answer (default for a load value), or why
    /// the body was refused (counted as malformed).
    pub fn take_polled(&self, slot: u32, gen: u32, format: PollFormat, body: &[u8], field: &[u8], now_us: u64) -> Result<AgentAnswer, ReportError> {
        if format == PollFormat::Agent {
            return self.agent_answer(slot, gen, body, now_us);
        }
        if slot >= self.params().max_peers || self.peer_head(slot).gen.load(Acquire) != gen {
            return Err(ReportError::Empty);
        }
        let h = self.peer_head(slot);
        let up = h.upstream.load(Relaxed);
        if up >= self.params().max_upstreams {
            return Err(ReportError::Empty);
        }
        let parsed = match format {
            PollFormat::Json => parse_json_field(body, field),
            _ => parse_prometheus(body, field),
        };
        match parsed {
            Ok(v) => {
                store(h, self.upstream(up).head, v, [f64::NAN, f64::NAN, f64::NAN, f64::NAN, v], now_us);
                Ok(AgentAnswer::default())
            }
            Err(e) => {
                h.reports_malformed.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// Applies an agent's answer for peer record `slot` (generation `gen`): `drain` and `maint` drain the peer
    /// (with an event), `up` puts it back, a percentage sets its weight in the cost. Returns the answer, or the
    /// reason it was refused (counted as malformed).
    pub fn agent_answer(&self, slot: u32, gen: u32, answer: &[u8], now_us: u64) -> Result<AgentAnswer, ReportError> {
        if slot >= self.params().max_peers || self.peer_head(slot).gen.load(Acquire) != gen {
            return Err(ReportError::Empty);
        }
        let h = self.peer_head(slot);
        let a = match parse_agent(answer) {
            Ok(a) => a,
            Err(e) => {
                h.reports_malformed.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        if let Some(w) = a.weight_percent {
            h.agent_weight.store(w.max(1), Relaxed);
        }
        if let Some(st) = a.state {
            let prev = h.agent_state.swap(st as u32, AcqRel);
            let draining = st != AgentState::Up;
            // Only the agent undoes what the agent did: `up` never re-enables a peer an operator drained.
            if draining || prev == AgentState::Drain as u32 || prev == AgentState::Maint as u32 {
                self.set_draining_for(slot, draining, crate::health::Reason::Agent, now_us);
            }
        }
        h.agent_us.store(now_us, Relaxed);
        Ok(a)
    }

    /// Refreshes the reported-load mean, sum and count of upstream `idx` (the upkeep).
    pub(crate) fn update_reports(&self, idx: u32, now_us: u64) {
        let up = self.upstream(idx);
        let h = up.head;
        if h.report_flags.load(Relaxed) & flag::COST == 0 || h.state.load(Acquire) != crate::layout::state::ACTIVE {
            return;
        }
        let blackout = h.report_blackout_us.load(Relaxed);
        let expiry = h.report_expiry_us.load(Relaxed);
        let n = h.npeers.load(Relaxed).min(self.params().max_peers) as usize;
        let (mut sum, mut count, mut nsum, mut ncount) = (0.0, 0u64, 0.0, 0u64);
        for s in up.slots.iter().take(n) {
            let slot = s.load(Relaxed);
            if slot >= self.params().max_peers {
                continue;
            }
            let p = self.peer_head(slot);
            if p.state.load(Acquire) != crate::layout::state::ACTIVE || p.upstream.load(Relaxed) != idx
                || p.health.load(Relaxed) != crate::health::state::HEALTHY
            {
                continue;
            }
            if usable(p.report_since_us.load(Relaxed), p.report_us.load(Relaxed), now_us, blackout, expiry) {
                sum += f64::from_bits(p.report_load.load(Relaxed));
                count += 1;
                let named = f64::from_bits(p.report_fields[4].load(Relaxed));
                if named.is_finite() {
                    nsum += named;
                    ncount += 1;
                }
            }
        }
        let mean = if count > 0 { sum / count as f64 } else { -1.0 };
        h.report_sum.store(f64::to_bits(sum), Relaxed);
        h.report_count.store(count, Relaxed);
        h.named_sum.store(f64::to_bits(nsum), Relaxed);
        h.named_count.store(ncount, Relaxed);
        h.report_mean.store(mean.to_bits(), Relaxed);
    }

    /// `(mean, sum, count)` of the usable reported loads of upstream `idx` at the last upkeep, and the sum and count
    /// of the named metric.
    pub fn reported_load(&self, idx: u32) -> Option<(f64, f64, u64, f64, u64)> {
        if idx >= self.params().max_upstreams {
            return None;
        }
        let h = self.upstream(idx).head;
        Some((
            f64::from_bits(h.report_mean.load(Relaxed)),
            f64::from_bits(h.report_sum.load(Relaxed)),
            h.report_count.load(Relaxed),
            f64::from_bits(h.named_sum.load(Relaxed)),
            h.named_count.load(Relaxed),
        ))
    }

    /// The reported values of peer record `slot`.
    pub fn peer_report(&self, slot: u32, now_us: u64) -> Option<PeerReport> {
        if slot >= self.params().max_peers {
            return None;
        }
        let h = self.peer_head(slot);
        let up = h.upstream.load(Relaxed).min(self.params().max_upstreams - 1);
        let uh = self.upstream(up).head;
        let last = h.report_us.load(Relaxed);
        Some(PeerReport {
            load: if last == 0 { f64::NAN } else { f64::from_bits(h.report_load.load(Relaxed)) },
            fields: std::array::from_fn(|i| f64::from_bits(h.report_fields[i].load(Relaxed))),
            age_us: if last == 0 { u64::MAX } else { now_us.saturating_sub(last) },
            usable: usable(h.report_since_us.load(Relaxed), last, now_us, uh.report_blackout_us.load(Relaxed), uh.report_expiry_us.load(Relaxed)),
            backoff_us: h.backoff_until_us.load(Relaxed).saturating_sub(now_us),
            reports: h.reports_total.load(Relaxed),
            malformed: h.reports_malformed.load(Relaxed),
            backpressure: h.backpressure_total.load(Relaxed),
            agent_state: h.agent_state.load(Relaxed),
            agent_weight: h.agent_weight.load(Relaxed),
        })
    }

    /// Clears the reported values of a peer record given to a new peer.
    pub(crate) fn reset_report(&self, slot: u32) {
        let h = self.peer_head(slot);
        h.report_load.store(0, Relaxed);
        for f in &h.report_fields {
            f.store(f64::NAN.to_bits(), Relaxed);
        }
        for w in [&h.report_since_us, &h.report_us, &h.backoff_until_us, &h.reports_total, &h.reports_malformed, &h.backpressure_total, &h.agent_us] {
            w.store(0, Relaxed);
        }
        h.agent_state.store(0, Relaxed);
        h.agent_weight.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Rng, XorShift64};

    #[test]
    fn orca_text() {
        let r = parse_orca(b"TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=120,eps=6, named_metrics.queue=4", b"queue").unwrap();
        assert_eq!(r.cpu_utilization, 0.3);
        assert_eq!(r.mem_utilization, 0.8);
        assert_eq!(r.rps_fractional, 120.0);
        assert_eq!(r.eps, 6.0);
        assert_eq!(r.named, Some(4.0));
        assert!((r.utilization(1.0) - 0.35).abs() < 1e-12);
        // application_utilization wins over cpu when above 0
        let r = parse_orca(b"text application_utilization=0.6,cpu_utilization=0.1", b"").unwrap();
        assert_eq!(r.utilization(1.0), 0.6);
        assert_eq!(r.named, None);
        // unknown keys are ignored, other named metrics too
        let r = parse_orca(b"TEXT utilization.gpu=0.9, named_metrics.other=3, cpu_utilization=0.5", b"queue").unwrap();
        assert_eq!((r.cpu_utilization, r.named), (0.5, None));
    }

    #[test]
    fn orca_json() {
        let r = parse_orca(
            br#"JSON {"cpu_utilization": 0.25, "rps_fractional": 10, "eps": 0, "named_metrics": {"queue": 7, "x": "y"}, "utilization": {"gpu": 0.5}, "request_cost": {}}"#,
            b"queue",
        )
        .unwrap();
        assert_eq!(r.cpu_utilization, 0.25);
        assert_eq!(r.rps_fractional, 10.0);
        assert_eq!(r.named, Some(7.0));
        assert!(parse_orca(br#"JSON {}"#, b"").is_ok());
        assert!(parse_orca(br#"JSON {"a":[1,[2,{"b":null}]],"cpu_utilization":1e-1}"#, b"").unwrap().cpu_utilization == 0.1);
    }

    #[test]
    fn malformed_headers_are_errors() {
        use ReportError::*;
        let cases: &[(&[u8], ReportError)] = &[
            (b"", Empty),
            (b"   ", Empty),
            (b"BIN CgkJAAAAAAAA4D8=", Format),
            (b"cpu_utilization=0.3", Format),
            (b"TEXT", Empty),
            (b"TEXT cpu_utilization", Syntax),
            (b"TEXT cpu_utilization=", Syntax),
            (b"TEXT cpu_utilization=abc", Syntax),
            (b"TEXT cpu_utilization=-1", Value),
            (b"TEXT cpu_utilization=1e400", Value),
            (b"TEXT cpu_utilization=0.1,,eps=1", Syntax),
            (b"TEXT cpu utilization=0.1", Syntax),
            (br#"JSON {"cpu_utilization": 0.3"#, Syntax),
            (br#"JSON {"cpu_utilization": "0.3"}"#, Syntax),
            (br#"JSON {"cpu_utilization": 0.3} x"#, Syntax),
            (br#"JSON {"cpu_utilization": -0.3}"#, Value),
            (br#"JSON [1]"#, Syntax),
            (br#"JSON {"a": tru}"#, Syntax),
        ];
        for (input, want) in cases {
            assert_eq!(parse_orca(input, b"q"), Err(*want), "{}", String::from_utf8_lossy(input));
        }
        let long = vec![b' '; MAX_REPORT_LEN + 1];
        assert_eq!(parse_orca(&long, b""), Err(TooLong));
        let deep = format!("JSON {}{}", "{\"a\":".repeat(40), "}".repeat(40));
        assert_eq!(parse_orca(deep.as_bytes(), b""), Err(Syntax));
    }

    #[test]
    fn plain_values_retry_after_and_agent_answers() {
        assert_eq!(parse_value(b" 0.73 "), Ok(0.73));
        assert_eq!(parse_value(b"73%"), Ok(0.73));
        assert!(parse_value(b"high").is_err());
        assert!(parse_value(b"-1").is_err());
        assert_eq!(parse_retry_after(b"2"), Some(2));
        assert_eq!(parse_retry_after(b" 120 "), Some(120));
        assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(b"-1"), None);
        assert_eq!(parse_retry_after(b"9999999999"), None);
        assert_eq!(parse_agent(b"drain\n").unwrap().state, Some(AgentState::Drain));
        assert_eq!(parse_agent(b"maint").unwrap().state, Some(AgentState::Maint));
        assert_eq!(parse_agent(b"up 50%").unwrap(), AgentAnswer { state: Some(AgentState::Up), weight_percent: Some(50) });
        assert_eq!(parse_agent(b"75%").unwrap().weight_percent, Some(75));
        assert!(parse_agent(b"hello").is_err());
        assert!(parse_agent(b"5000%").is_err());
        assert!(parse_agent(b"%").is_err());
    }

    #[test]
    fn polled_endpoints() {
        assert_eq!(parse_json_field(br#"{"queue": 3, "x": [1]}"#, b"queue"), Ok(3.0));
        assert_eq!(parse_json_field(br#"{"a": {"b": {"queue": 0.5}}, "queue": 9}"#, b"a.b.queue"), Ok(0.5));
        assert_eq!(parse_json_field(br#"{"queue": "3"}"#, b"queue"), Err(ReportError::Value));
        assert_eq!(parse_json_field(br#"{"other": 3}"#, b"queue"), Err(ReportError::Syntax));
        assert_eq!(parse_json_field(br#"{"queue": 3"#, b"queue"), Err(ReportError::Syntax));
        let prom = b"# HELP queue_depth_total x\n# TYPE queue gauge\nqueue_depth_total 99\nqueue{pool=\"a\"} 4 1700000000\n";
        assert_eq!(parse_prometheus(prom, b"queue"), Ok(4.0));
        assert_eq!(parse_prometheus(prom, b"queue_depth_total"), Ok(99.0));
        assert_eq!(parse_prometheus(prom, b"missing"), Err(ReportError::Syntax));
        assert_eq!(parse_prometheus(b"queue NaN\n", b"queue"), Err(ReportError::Syntax));
    }

    #[test]
    fn smoothing_follows_a_step_with_its_time_constant() {
        assert_eq!(smooth(0.2, 0.8, 1000, 0), 0.8, "off");
        // reports every 5 ms of a step from 0.2 to 0.8: after one time constant about 63 % of the way
        let mut v = 0.2;
        for _ in 0..100 {
            v = smooth(v, 0.8, 5000, 500_000);
        }
        assert!((v - (0.2 + 0.6 * (1.0 - (-1.0f64).exp()))).abs() < 1e-9, "{v}");
        assert_eq!(smooth(f64::NAN, 0.5, 10, 1000), 0.5);
        // an old report counts as the mean one time constant after it came
        assert_eq!(aged(0.9, 0.5, 0, 500_000.0), 0.9);
        assert!((aged(0.9, 0.5, 250_000, 500_000.0) - 0.7).abs() < 1e-12);
        assert_eq!(aged(0.9, 0.5, 5_000_000, 500_000.0), 0.5);
        assert_eq!(aged(0.9, 0.5, 5_000_000, 0.0), 0.9, "off without smoothing");
    }

    #[test]
    fn usable_honours_blackout_and_expiry() {
        let (b, e) = (10_000_000, 180_000_000);
        assert!(!usable(0, 0, 50_000_000, b, e), "never reported");
        assert!(!usable(1_000_000, 5_000_000, 5_000_000, b, e), "in blackout");
        assert!(usable(1_000_000, 11_000_000, 11_000_000, b, e));
        assert!(!usable(1_000_000, 11_000_000, 191_000_000, b, e), "expired");
    }

    /// The formula's fixed point for the documented example: capacities 4/8/8/8 at equal latency; shares that make
    /// `1 + n + scale × n / c` equal across peers (n in flight = utilization × capacity).
    #[test]
    fn cost_evens_out_utilization() {
        let caps = [4.0, 8.0, 8.0, 8.0];
        let total_inflight = 0.7 * 28.0;
        // With cost 1 + n + s·n/c = K for every peer, n = (K − 1)·c/(c + s); solve K from the total.
        for (scale, lo, hi) in [(100.0, 0.143, 0.150), (0.0, 0.249, 0.251)] {
            let per_k: f64 = caps.iter().map(|c| c / (c + scale)).sum();
            let k1 = total_inflight / per_k;
            let n_weak = k1 * caps[0] / (caps[0] + scale);
            let share = n_weak / total_inflight;
            assert!(share > lo && share < hi, "scale {scale}: {share}");
            let costs: Vec<f64> = caps
                .iter()
                .map(|c| {
                    let n = k1 * c / (c + scale);
                    reported_cost(5000.0, n, 5000.0, 1.0, scale, n / c)
                })
                .collect();
            assert!(costs.iter().all(|x| (x - costs[0]).abs() < 1e-6 * costs[0]), "{costs:?}");
        }
    }

    /// Property: random bytes, and random mutations of valid headers, never panic and never yield a value out of
    /// range; every parser stays linear (checked by a bound on total work through the input sizes used).
    #[test]
    fn parsers_never_panic_on_random_input() {
        let mut rng = XorShift64::new(0x5eed);
        let seeds: [&[u8]; 5] = [
            b"TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue=4",
            br#"JSON {"cpu_utilization":0.3,"named_metrics":{"queue":4},"a":[1,{"b":[true,null]}]}"#,
            b"0.73",
            b"up 50%",
            b"120",
        ];
        let alphabet = b" \t,=.{}[]\":-+eE0123456789TEXTJSONtruefalsenull%a_";
        let mut buf = [0u8; 256];
        let started = std::time::Instant::now();
        for case in 0..200_000u32 {
            let n = rng.below(buf.len() as u32) as usize;
            let input: &[u8] = if case % 2 == 0 {
                for b in &mut buf[..n] {
                    *b = if rng.below(4) == 0 { rng.below(256) as u8 } else { alphabet[rng.below(alphabet.len() as u32) as usize] };
                }
                &buf[..n]
            } else {
                let seed = seeds[rng.below(seeds.len() as u32) as usize];
                let len = seed.len().min(buf.len());
                buf[..len].copy_from_slice(&seed[..len]);
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(len as u32) as usize;
                    buf[at] = alphabet[rng.below(alphabet.len() as u32) as usize];
                }
                &buf[..len]
            };
            if let Ok(r) = parse_orca(input, b"queue") {
                for v in [r.cpu_utilization, r.application_utilization, r.rps_fractional, r.eps, r.named.unwrap_or(0.0)] {
                    assert!(v.is_finite() && (0.0..=MAX_VALUE).contains(&v));
                }
                assert!(r.utilization(1.0).is_finite());
            }
            if let Ok(v) = parse_value(input) {
                assert!(v.is_finite() && v >= 0.0);
            }
            let _ = parse_retry_after(input);
            if let Ok(v) = parse_json_field(input, b"load.queue") {
                assert!(v.is_finite() && v >= 0.0);
            }
            if let Ok(v) = parse_prometheus(input, b"queue") {
                assert!(v.is_finite() && v >= 0.0);
            }
            if let Ok(a) = parse_agent(input) {
                assert!(a.weight_percent.is_none_or(|w| w <= 1000));
            }
        }
        // Bounded time: 200,000 inputs of up to 256 bytes in well under the test's patience, even unoptimised.
        assert!(started.elapsed().as_secs() < 60);
        // Worst-case nesting at the length limit stays fast.
        let mut deep = b"JSON ".to_vec();
        deep.extend(std::iter::repeat_n(b'[', MAX_REPORT_LEN - 5));
        let t = std::time::Instant::now();
        assert!(parse_orca(&deep, b"").is_err());
        assert!(t.elapsed().as_millis() < 100);
    }
}
