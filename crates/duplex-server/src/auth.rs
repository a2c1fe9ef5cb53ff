//! Connection tokens: JWTs that name the user (`sub`) of a connection.
//!
//! Tokens are HS256 signed with `--jwt-secret`, or ES256/RS256 checked against
//! `--jwt-public-key`; signature, algorithm (exactly one, chosen by the configuration: `alg: none`
//! and algorithm confusion are refused by construction), expiry (`exp`) and not-before (`nbf`)
//! are verified with no leeway, and `sub` must name someone. Refusals say what is wrong in our
//! words ([`TokenError`]); the library's own message goes to the debug log only. The user a
//! token names (`sub`) is what presence shows and what
//! `POST /api/users/{user}/request` addresses; its `channels` claim (names, or prefixes ending in
//! `*`) is what `token_channels` namespace rules check; its `meta` (any JSON) is what presence
//! shows for the connection.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::hub::namespace::ClientAuth;

/// Checks connection tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

/// The claims duplex reads.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    meta: Option<Box<serde_json::value::RawValue>>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// The token's `nbf` is still ahead.
    #[error("the token is not valid yet (its nbf is in the future)")]
    NotYetValid,
    /// Anything else: bad signature, wrong algorithm, malformed, missing claims; the reason is
    /// ours, never the library's text.
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
    /// The server has no secret to check tokens with.
    #[error("this server does not accept tokens (no JWT secret is configured)")]
    NotConfigured,
}

impl TokenError {
    /// The protocol code of this refusal.
    pub fn code(&self) -> duplex_proto::ErrorCode {
        use duplex_proto::ErrorCode;
        match self {
            TokenError::Expired => ErrorCode::TokenExpired,
            TokenError::NotYetValid => ErrorCode::TokenNotYetValid,
            TokenError::Invalid(_) | TokenError::NotConfigured => ErrorCode::InvalidToken,
        }
    }
}

/// Our words for what the JWT library refused.
fn refusal(error: &jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    tracing::debug!(%error, "token refused");
    match error.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidSignature => TokenError::Invalid("its signature does not verify"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            TokenError::Invalid("it is signed with an algorithm this server does not accept")
        }
        ErrorKind::MissingRequiredClaim(_) => {
            TokenError::Invalid("it lacks a required claim (sub and exp)")
        }
        ErrorKind::Json(_) => TokenError::Invalid("its claims are not of the expected types"),
        _ => TokenError::Invalid("it is not a well-formed signed JWT"),
    }
}

impl TokenVerifier {
    /// Verifies ES256 or RS256 tokens against a public key (PEM: EC P-256 or RSA); the
    /// algorithm follows from the key, and no other is accepted (so an HS256 token "signed" with
    /// the public key as a secret is refused).
    pub fn public_key(pem: &[u8]) -> Result<Self, TokenError> {
        let (key, algorithm) = match DecodingKey::from_ec_pem(pem) {
            Ok(key) => (key, Algorithm::ES256),
            Err(_) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(error) => {
                    tracing::debug!(%error, "not an RSA public key either");
                    return Err(TokenError::Invalid(
                        "the public key is neither EC nor RSA PEM",
                    ));
                }
            },
        };
        Ok(TokenVerifier {
            key,
            validation: validation(algorithm),
        })
    }

    /// Verifies HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Self {
        TokenVerifier {
            key: DecodingKey::from_secret(secret),
            validation: validation(Algorithm::HS256),
        }
    }

    /// The user (`sub`) of a valid token.
    pub fn user_of(&self, token: &str) -> Result<String, TokenError> {
        self.verify(token)
            .map(|auth| auth.user.map(|u| u.to_string()).unwrap_or_default())
    }

    /// What a valid token says: its user and the channels it lists.
    pub fn verify(&self, token: &str) -> Result<ClientAuth, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| refusal(&error))?;
        if data.claims.sub.trim().is_empty() {
            return Err(TokenError::Invalid("its sub is empty"));
        }
        Ok(ClientAuth {
            user: Some(data.claims.sub.into()),
            channels: data.claims.channels,
            expires_at: Some(data.claims.exp),
            meta: data.claims.meta.map(std::sync::Arc::from),
        })
    }
}

/// What every token must pass: `exp` and `sub` present, `exp` and `nbf` checked with no
/// leeway (RFC 7519 §4.1.5: a token must not be accepted before its `nbf`).
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &[u8], algorithm: Algorithm, claims: serde_json::Value) -> String {
        encode(
            &Header::new(algorithm),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encode")
    }

    fn in_an_hour() -> u64 {
        jsonwebtoken::get_current_timestamp() + 3600
    }

    #[test]
    fn valid_tokens_name_their_user() {
        let verifier = TokenVerifier::hs256(b"secret");
        let good = token(
            b"secret",
            Algorithm::HS256,
            serde_json::json!({"sub": "ana", "exp": in_an_hour()}),
        );
        assert_eq!(verifier.user_of(&good), Ok("ana".into()));
    }

    #[test]
    fn forged_expired_and_wrong_algorithm_tokens_are_refused() {
        let verifier = TokenVerifier::hs256(b"secret");
        let wrong_key = token(
            b"other",
            Algorithm::HS256,
            serde_json::json!({"sub": "ana", "exp": in_an_hour()}),
        );
        assert!(matches!(
            verifier.user_of(&wrong_key),
            Err(TokenError::Invalid(_))
        ));
        let expired = token(
            b"secret",
            Algorithm::HS256,
            serde_json::json!({"sub": "ana", "exp": 1000}),
        );
        assert_eq!(verifier.user_of(&expired), Err(TokenError::Expired));
        let hs512 = token(
            b"secret",
            Algorithm::HS512,
            serde_json::json!({"sub": "ana", "exp": in_an_hour()}),
        );
        assert!(matches!(
            verifier.user_of(&hs512),
            Err(TokenError::Invalid(_))
        ));
        let no_sub = token(
            b"secret",
            Algorithm::HS256,
            serde_json::json!({"exp": in_an_hour()}),
        );
        assert!(matches!(
            verifier.user_of(&no_sub),
            Err(TokenError::Invalid(_))
        ));
        // alg: none, unsigned.
        use base64::Engine as _;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&format!(r#"{{"sub":"ana","exp":{}}}"#, in_an_hour()))
        );
        assert!(matches!(
            verifier.user_of(&none),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            verifier.user_of("garbage"),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn nbf_in_the_future_and_an_empty_sub_are_refused_in_our_words() {
        let verifier = TokenVerifier::hs256(b"secret");
        let now = jsonwebtoken::get_current_timestamp();
        let tomorrow = token(
            b"secret",
            Algorithm::HS256,
            serde_json::json!({"sub": "ana", "exp": now + 172_800, "nbf": now + 86_400}),
        );
        assert_eq!(
            verifier.verify(&tomorrow).err(),
            Some(TokenError::NotYetValid)
        );
        let already = token(
            b"secret",
            Algorithm::HS256,
            serde_json::json!({"sub": "ana", "exp": now + 3600, "nbf": now - 10}),
        );
        assert!(verifier.verify(&already).is_ok());
        let empty = token(
            b"secret",
            Algorithm::HS256,
            serde_json::json!({"sub": "", "exp": now + 3600}),
        );
        assert_eq!(
            verifier.verify(&empty).err(),
            Some(TokenError::Invalid("its sub is empty"))
        );
        let wrong_key = token(
            b"other",
            Algorithm::HS256,
            serde_json::json!({"sub": "ana", "exp": now + 3600}),
        );
        let message = verifier
            .verify(&wrong_key)
            .expect_err("refused")
            .to_string();
        assert_eq!(
            message,
            "the token is not valid: its signature does not verify"
        );
    }

    #[test]
    fn es256_tokens_verify_against_the_public_key_and_nothing_else_does() {
        let pair = rcgen::KeyPair::generate().expect("a P-256 key pair");
        let verifier =
            TokenVerifier::public_key(pair.public_key_pem().as_bytes()).expect("an EC key");
        let claims = serde_json::json!({"sub": "ana", "exp": in_an_hour()});
        let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("key");
        let good = encode(&Header::new(Algorithm::ES256), &claims, &signing).expect("encode");
        assert_eq!(verifier.user_of(&good), Ok("ana".into()));
        // HS/ES confusion: an HS256 token whose "secret" is the public key.
        let confused = token(
            pair.public_key_pem().as_bytes(),
            Algorithm::HS256,
            claims.clone(),
        );
        assert!(matches!(
            verifier.user_of(&confused),
            Err(TokenError::Invalid(_))
        ));
        let other = rcgen::KeyPair::generate().expect("another key pair");
        let forged = encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).expect("key"),
        )
        .expect("encode");
        assert!(matches!(
            verifier.user_of(&forged),
            Err(TokenError::Invalid(_))
        ));
        assert!(TokenVerifier::public_key(b"not a key").is_err());
    }
}
