//! The policy file format as written: serde types, no validation beyond YAML types.
//!
//! Every struct denies unknown fields, so a typo is an error, never a silently ignored
//! constraint. Validation and compilation live in `model` (and the matcher modules);
//! maps whose keys are user data (`query`, `headers`) keep the file order and reject a
//! key given twice.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// A scopegate policy file: one workload document, or a list of them.
#[derive(JsonSchema)]
#[schemars(untagged)]
#[allow(dead_code, reason = "only its schema is used")]
pub(crate) enum PolicyFile {
    /// One workload document.
    One(Box<Workload>),
    /// A list of workloads.
    Many(Vec<Workload>),
}

/// One workload document.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Workload {
    /// The workload's name, unique across the directory.
    pub workload: String,
    /// How the kernel identifies the workload.
    pub select: Select,
    /// `enforce` (default) or `audit`: what enforce mode refuses by policy (HTTP the rules
    /// do not allow, a TCP port no destination names, UDP, DNS without `dns:`) passes and
    /// is recorded `would_deny` with the same reason; integrity refusals (no policy, other
    /// network namespace, raw sockets, malformed requests) stay refusals.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Largest request body buffered for `json` rules, e.g. `64KiB`.
    #[serde(default)]
    pub body_cap: Option<Scalar>,
    /// Most connections the workload may hold open through the proxy at once.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Allowed destinations and L4 exceptions; an empty list denies everything.
    pub egress: Vec<Egress>,
    /// DNS through the agent's DNS proxy: `system`, a list of resolver addresses, or
    /// `{names, types, resolvers}`. Absent: no DNS at all.
    #[serde(default)]
    pub dns: Option<Dns>,
}

/// `dns:` as written: a keyword, a list of resolver addresses, or a mapping.
#[derive(Debug)]
pub(crate) enum Dns {
    /// `system`.
    Keyword(String),
    /// Resolver IP addresses.
    Resolvers(Vec<String>),
    /// `{names, types, resolvers}`.
    Rules(DnsRules),
}

/// The mapping form of `dns:`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DnsRules {
    /// Name patterns allowed besides the destinations' names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Query types allowed besides A and AAAA.
    #[serde(default)]
    pub types: Vec<String>,
    /// Resolvers to forward to (absent: the host's).
    #[serde(default)]
    pub resolvers: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for Dns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Dns;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`system`, a list of resolver addresses, or {names, types, resolvers}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dns, E> {
                Ok(Dns::Keyword(v.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Dns, A::Error> {
                let mut list = Vec::new();
                while let Some(r) = seq.next_element::<String>()? {
                    list.push(r);
                }
                Ok(Dns::Resolvers(list))
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Dns, M::Error> {
                DnsRules::deserialize(de::value::MapAccessDeserializer::new(map)).map(Dns::Rules)
            }
        }
        d.deserialize_any(V)
    }
}

/// `allow_internal:` as written.
#[derive(Debug)]
pub(crate) enum AllowInternal {
    /// `true` or `false`.
    Flag(bool),
    /// Address ranges, e.g. `[10.0.0.0/8]`.
    Ranges(Vec<String>),
}

impl<'de> Deserialize<'de> for AllowInternal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AllowInternal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`true`, `false` or a list of CIDRs")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AllowInternal, E> {
                Ok(AllowInternal::Flag(v))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<AllowInternal, A::Error> {
                let mut ranges = Vec::new();
                while let Some(r) = seq.next_element::<String>()? {
                    ranges.push(r);
                }
                Ok(AllowInternal::Ranges(ranges))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `egress` entry as written: an HTTP destination (`host`, `port`, `rules`, …) or an
/// L4 exception (`cidr`, `ports`, `protocol`). Which one is decided in validation, so that
/// a mix-up gets a precise error with its position.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Egress {
    /// A DNS name or an IP literal (HTTP destination).
    pub host: Option<String>,
    /// Kept wide so that an out-of-range port is reported by validation, with the value.
    pub port: Option<i64>,
    /// Whether request paths may carry `;` path parameters.
    #[serde(default)]
    pub path_params: bool,
    /// Whether request header names may contain `_` (refused by default: servers that
    /// map headers to CGI variables fold `X_Role` and `X-Role` into one).
    #[serde(default)]
    pub allow_underscore_headers: bool,
    /// Which internal addresses (loopback, private, link-local, …) a name destination may
    /// be bound to: `true`, or a list of CIDRs. Absent: none.
    #[serde(default)]
    pub allow_internal: Option<AllowInternal>,
    /// `N/second|minute|hour` for the whole destination.
    #[serde(default)]
    pub rate: Option<String>,
    /// Time window for the whole destination.
    #[serde(default)]
    pub when: Option<When>,
    /// When the grant ends (RFC 3339 with an offset or Z); after it, `grant_expired`.
    #[serde(default)]
    pub expires: Option<String>,
    /// The L7 rules; a request passes if one of them allows it.
    pub rules: Option<Vec<Rule>>,
    /// An address range passed straight through in the kernel (L4 exception).
    pub cidr: Option<String>,
    /// The L4 exception's ports.
    pub ports: Option<Vec<i64>>,
    /// The L4 exception's protocol: `tcp` (default) or `udp`.
    pub protocol: Option<String>,
    /// `none` (plain HTTP, default), `passthrough` (TLS, decided by SNI, spliced) or
    /// `intercept` (TLS terminated with a host-CA leaf, every request decided).
    pub tls: Option<String>,
    /// Originate verified TLS to the upstream (default: true for `intercept`, false
    /// otherwise).
    pub upstream_tls: Option<bool>,
    /// A credential injected into every allowed request to this destination.
    pub credential: Option<Credential>,
}

/// `credential:` as written.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Credential {
    /// The header to set (replacing whatever the workload sent).
    pub header: String,
    /// The header value, with `{secret}` standing for the secret (default `{secret}`).
    pub format: Option<String>,
    /// A file holding the secret (re-read when it changes).
    pub secret_file: Option<String>,
    /// A systemd credential name (`$CREDENTIALS_DIRECTORY/NAME`, from `LoadCredential=`).
    pub systemd_credential: Option<String>,
}

/// `mode:` as written.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Deny what no rule allows.
    Enforce,
    /// Allow what enforce mode refuses by policy, in the proxy and in the kernel, and
    /// record it as `would_deny`.
    Audit,
}

/// The workload's identity: exactly one of `cgroup` and `systemd_unit`, plus an optional
/// `uid` condition.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Select {
    /// A cgroup v2 path (or glob) relative to the cgroup2 mount.
    pub cgroup: Option<String>,
    /// A systemd unit name.
    pub systemd_unit: Option<String>,
    /// Kept wide so that an out-of-range uid is reported by validation, with the value.
    pub uid: Option<i64>,
}

/// One allowed destination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Destination {
    /// A DNS name or an IP literal.
    pub host: String,
    /// Kept wide so that an out-of-range port is reported by validation, with the value.
    pub port: i64,
    /// Whether request paths may carry `;` path parameters.
    #[serde(default)]
    pub path_params: bool,
    /// Whether request header names may contain `_` (refused by default: servers that
    /// map headers to CGI variables fold `X_Role` and `X-Role` into one).
    #[serde(default)]
    pub allow_underscore_headers: bool,
    /// Which internal addresses (loopback, private, link-local, …) a name destination may
    /// be bound to: `true`, or a list of CIDRs. Absent: none.
    #[serde(default)]
    pub allow_internal: Option<AllowInternal>,
    /// `N/second|minute|hour` for the whole destination.
    #[serde(default)]
    pub rate: Option<String>,
    /// Time window for the whole destination.
    #[serde(default)]
    pub when: Option<When>,
    /// When the grant ends.
    #[serde(default)]
    pub expires: Option<String>,
    /// The L7 rules; a request passes if one of them allows it.
    pub rules: Vec<Rule>,
    /// TLS mode as written.
    pub tls: Option<String>,
    /// Upstream TLS as written.
    pub upstream_tls: Option<bool>,
    /// Destination credential.
    pub credential: Option<Credential>,
}

/// One L7 rule.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rule {
    /// Rule id, unique within the workload; appears in audit records.
    pub id: String,
    /// Allowed methods, uppercase.
    pub methods: Vec<String>,
    /// Path pattern.
    pub path: String,
    /// Query parameter constraints; absent means any query.
    #[serde(default)]
    pub query: Option<OrderedMap<QueryRule>>,
    /// Query parameters that may be repeated.
    #[serde(default)]
    pub query_repeat: Option<Vec<String>>,
    /// Header constraints.
    #[serde(default)]
    pub headers: Option<OrderedMap<HeaderRule>>,
    /// JSON body constraints.
    #[serde(default)]
    pub json: Option<Vec<JsonRule>>,
    /// Time window for this rule.
    #[serde(default)]
    pub when: Option<When>,
    /// When this rule's grant ends (RFC 3339 with an offset or Z); after it,
    /// `grant_expired`.
    #[serde(default)]
    pub expires: Option<String>,
    /// `N/second|minute|hour` for this rule.
    #[serde(default)]
    pub rate: Option<String>,
    /// A credential for requests this rule allows (instead of the destination's).
    #[serde(default)]
    pub credential: Option<Credential>,
}

/// A time window.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct When {
    /// `mon` .. `sun`.
    #[serde(default)]
    pub days: Option<Vec<String>>,
    /// `HH:MM-HH:MM`.
    #[serde(default)]
    pub hours: Option<String>,
    /// IANA zone name, e.g. `Europe/Berlin`.
    pub timezone: String,
}

/// The value of one `query:` entry.
#[derive(Debug)]
pub(crate) enum QueryRule {
    /// `any`.
    Any,
    /// `absent`.
    Absent,
    /// `present`.
    Present,
    /// `{one_of: [...]}` or `{pattern: ...}`.
    Value(ValueRule),
}

/// The value of one `headers:` entry.
#[derive(Debug)]
pub(crate) enum HeaderRule {
    /// `required`.
    Required,
    /// `forbidden`.
    Forbidden,
    /// `{one_of: [...]}` or `{pattern: ...}`.
    Value(ValueRule),
}

/// A constraint on a textual value: exactly one of `one_of`, `pattern`, `not_one_of` and
/// `not_pattern` (checked by validation), and `optional`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ValueRule {
    /// Allowed values, compared exactly.
    pub one_of: Option<Vec<Scalar>>,
    /// A regular expression the whole value must match.
    pub pattern: Option<String>,
    /// Refused values, compared ASCII case-insensitively; any other value is allowed.
    pub not_one_of: Option<Vec<Scalar>>,
    /// A regular expression the whole value must not match.
    pub not_pattern: Option<String>,
    /// `true`: the parameter or header may be absent; when present it must match.
    pub optional: Option<bool>,
}

/// One `json:` entry.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JsonRule {
    /// Dot path into the body, e.g. `customer.address.country` or `items.0.sku`.
    pub field: String,
    /// Allowed values (strings, numbers, booleans, null).
    #[serde(default)]
    #[schemars(with = "Option<Vec<serde_json::Value>>")]
    pub one_of: Option<Vec<serde_yaml::Value>>,
    /// Smallest allowed number.
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest allowed number.
    #[serde(default)]
    pub max: Option<f64>,
    /// A regular expression the whole string must match.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Longest allowed string (characters) or array (elements).
    #[serde(default)]
    pub max_len: Option<u64>,
    /// `true`: the field must not be present.
    #[serde(default)]
    pub absent: Option<bool>,
}

/// A YAML scalar (string, number or boolean) read as its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A keyword (`absent`, ...) or a `{one_of|pattern}` map.
fn keyword_or_value<'de, D, T>(
    d: D,
    expected: &'static str,
    keyword: fn(&str) -> Option<T>,
    value: fn(ValueRule) -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T> {
        expected: &'static str,
        keyword: fn(&str) -> Option<T>,
        value: fn(ValueRule) -> T,
    }
    impl<'de, T> Visitor<'de> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expected)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.keyword)(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let rule = ValueRule::deserialize(de::value::MapAccessDeserializer::new(map))?;
            Ok((self.value)(rule))
        }
    }
    d.deserialize_any(V {
        expected,
        keyword,
        value,
    })
}

impl<'de> Deserialize<'de> for QueryRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        keyword_or_value(
            d,
            "any, absent, present, {one_of|pattern|not_one_of|not_pattern, optional}",
            |k| match k {
                "any" => Some(QueryRule::Any),
                "absent" => Some(QueryRule::Absent),
                "present" => Some(QueryRule::Present),
                _ => None,
            },
            QueryRule::Value,
        )
    }
}

impl<'de> Deserialize<'de> for HeaderRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        keyword_or_value(
            d,
            "required, forbidden, {one_of|pattern|not_one_of|not_pattern, optional}",
            |k| match k {
                "required" => Some(HeaderRule::Required),
                "forbidden" => Some(HeaderRule::Forbidden),
                _ => None,
            },
            HeaderRule::Value,
        )
    }
}

/// A YAML mapping with string keys, in file order; a repeated key is an error.
#[derive(Debug)]
pub(crate) struct OrderedMap<T>(pub Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, T)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
                    }
                    let value = map.next_value()?;
                    out.push((key, value));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

// ---------------------------------------------------------------- JSON Schema of the
// types with hand-written `Deserialize` (keyword-or-mapping forms).

impl JsonSchema for Dns {
    fn schema_name() -> Cow<'static, str> {
        "Dns".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let rules = generator.subschema_for::<DnsRules>();
        json_schema!({
            "description": "DNS through the agent's DNS proxy: `system` (the host's resolvers), a list of resolver addresses, or {names, types, resolvers}. Absent: no DNS at all.",
            "anyOf": [
                {"type": "string", "enum": ["system"]},
                {"type": "array", "items": {"type": "string"}},
                rules
            ]
        })
    }
}

impl JsonSchema for AllowInternal {
    fn schema_name() -> Cow<'static, str> {
        "AllowInternal".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Internal addresses (loopback, private, link-local, CGNAT, ULA, ...) a name destination may be bound to: true, or a list of CIDRs.",
            "anyOf": [
                {"type": "boolean"},
                {"type": "array", "items": {"type": "string"}}
            ]
        })
    }
}

impl JsonSchema for Scalar {
    fn schema_name() -> Cow<'static, str> {
        "Scalar".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A string, number or boolean, compared as its text.",
            "type": ["string", "number", "boolean"]
        })
    }
}

impl JsonSchema for QueryRule {
    fn schema_name() -> Cow<'static, str> {
        "QueryRule".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let value = generator.subschema_for::<ValueRule>();
        json_schema!({
            "description": "any, absent, present, {one_of|pattern|not_one_of|not_pattern, optional}.",
            "anyOf": [
                {"type": "string", "enum": ["any", "absent", "present"]},
                value
            ]
        })
    }
}

impl JsonSchema for HeaderRule {
    fn schema_name() -> Cow<'static, str> {
        "HeaderRule".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let value = generator.subschema_for::<ValueRule>();
        json_schema!({
            "description": "required, forbidden, {one_of|pattern|not_one_of|not_pattern, optional}.",
            "anyOf": [
                {"type": "string", "enum": ["required", "forbidden"]},
                value
            ]
        })
    }
}

impl<T: JsonSchema> JsonSchema for OrderedMap<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("Map_of_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let value = generator.subschema_for::<T>();
        json_schema!({
            "type": "object",
            "additionalProperties": value
        })
    }
}
