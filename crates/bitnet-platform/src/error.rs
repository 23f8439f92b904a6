//! The platform's one error type. The HTTP layer maps each variant to a status and an
//! OpenAI-shaped body; the CLI prints it as a sentence.

/// What went wrong in the store or the domain rules.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// No such object in the caller's organization (another organization's ids land here too:
    /// existence is never leaked).
    #[error("no {kind} with id `{id}`")]
    NotFound { kind: &'static str, id: String },
    /// A value the caller sent is not acceptable; `param` names the field.
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    /// A credential (password, token, invite secret) was refused.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but not let in (single sign-on from a domain the organization does
    /// not allow).
    #[error("{0}")]
    Forbidden(String),
    /// An identity provider could not be reached or answered something unusable.
    #[error("{0}")]
    Upstream(String),
    /// The change conflicts with what is stored (a duplicate name, an archived project).
    #[error("{0}")]
    Conflict(String),
    /// A budget's hard cap would be passed: the request is refused before it runs.
    #[error("{0}")]
    Quota(String),
    /// The database URL names something this build cannot open.
    #[error("database {0:?}: expected sqlite://PATH, sqlite::memory: or postgres://USER@HOST/DB")]
    BadUrl(String),
    #[error("database migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    /// The platform's own setup is wrong (a master key that does not fit, a storage URL).
    #[error("{0}")]
    Config(String),
    /// The artifact storage failed, or a stored object does not authenticate.
    #[error("storage: {0}")]
    Storage(String),
    /// More bytes than the limit allows.
    #[error("{0}")]
    TooLarge(String),
}

impl PlatformError {
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            kind,
            id: id.into(),
        }
    }

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param,
            message: message.into(),
        }
    }
}

pub type Result<T, E = PlatformError> = std::result::Result<T, E>;
