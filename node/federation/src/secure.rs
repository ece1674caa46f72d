//! The site's side of secure aggregation: one fresh X25519 key pair per peer per session
//! (ring's ephemeral keys are single-use), a shared secret per pair, expanded by HKDF-SHA256
//! and ChaCha20 into a mask as long as the vector; the site with the smaller name adds the
//! mask, the other subtracts it, so every pair's masks cancel in the coordinator's sum.

use protocol::secure::PeerKey;
use protocol::{SchemaHash, SiteId};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::{aead, hkdf};

/// What can go wrong computing masks.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("the system random generator failed")]
    Random,
    #[error("a peer's public key is not a valid X25519 key")]
    BadPeerKey,
    #[error("no key of ours for peer {0}")]
    MissingKey(String),
}

/// This site's private keys for one session, one per peer.
pub struct SessionKeys {
    privates: Vec<(SiteId, EphemeralPrivateKey)>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("peers", &self.privates.len())
            .finish()
    }
}

impl SessionKeys {
    /// Fresh key pairs for every participant but `me`; returns the public keys to send.
    pub fn generate(
        me: &SiteId,
        participants: &[SiteId],
    ) -> Result<(Self, Vec<PeerKey>), MaskError> {
        let rng = ring::rand::SystemRandom::new();
        let mut privates = Vec::new();
        let mut publics = Vec::new();
        for p in participants.iter().filter(|p| *p != me) {
            let k = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| MaskError::Random)?;
            let public = k.compute_public_key().map_err(|_| MaskError::Random)?;
            let mut b = [0u8; 32];
            b.copy_from_slice(public.as_ref());
            publics.push(PeerKey {
                peer: p.clone(),
                public: b,
            });
            privates.push((p.clone(), k));
        }
        Ok((SessionKeys { privates }, publics))
    }

    /// Mask `vector` with every peer's key (consumes the private keys).
    pub fn mask(
        self,
        me: &SiteId,
        peers: &[PeerKey],
        context: &MaskContext,
        vector: &[u64],
    ) -> Result<Vec<u64>, MaskError> {
        let mut out = vector.to_vec();
        let mut privates = self.privates;
        for pk in peers {
            let i = privates
                .iter()
                .position(|(p, _)| *p == pk.peer)
                .ok_or_else(|| MaskError::MissingKey(pk.peer.to_string()))?;
            let (_, private) = privates.swap_remove(i);
            let stream = agreement::agree_ephemeral(
                private,
                &UnparsedPublicKey::new(&X25519, pk.public),
                |shared| prg(shared, context, vector.len()),
            )
            .map_err(|_| MaskError::BadPeerKey)??;
            combine(&mut out, stream, me < &pk.peer);
        }
        Ok(out)
    }
}

/// Add the pair's mask words (the site with the smaller name) or subtract them (the other).
fn combine(words: &mut [u64], mask: impl IntoIterator<Item = u64>, add: bool) {
    for (w, m) in words.iter_mut().zip(mask) {
        *w = if add {
            w.wrapping_add(m)
        } else {
            w.wrapping_sub(m)
        };
    }
}

/// A pairwise secret for masks that must be re-derived later (training: every chunk of every
/// round, also after a restart): HKDF-SHA256 of the X25519 shared secret.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct PairSeed {
    pub peer: SiteId,
    pub seed: [u8; 32],
}

impl std::fmt::Debug for PairSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairSeed")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// Agree with every peer and keep the pairwise seeds (consumes the private keys).
    pub fn pair_seeds(
        self,
        peers: &[PeerKey],
        context: &MaskContext,
    ) -> Result<Vec<PairSeed>, MaskError> {
        let mut privates = self.privates;
        let mut out = Vec::new();
        for pk in peers {
            let i = privates
                .iter()
                .position(|(p, _)| *p == pk.peer)
                .ok_or_else(|| MaskError::MissingKey(pk.peer.to_string()))?;
            let (_, private) = privates.swap_remove(i);
            let seed = agreement::agree_ephemeral(
                private,
                &UnparsedPublicKey::new(&X25519, pk.public),
                |shared| {
                    let mut salt = b"fedcurate training masks v1".to_vec();
                    salt.extend_from_slice(&context.schema.0);
                    salt.extend_from_slice(&context.session.to_be_bytes());
                    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
                    let mut seed = [0u8; 32];
                    prk.expand(&[b"pair seed"], hkdf::HKDF_SHA256)
                        .and_then(|okm| okm.fill(&mut seed))
                        .map(|_| seed)
                        .map_err(|_| MaskError::Random)
                },
            )
            .map_err(|_| MaskError::BadPeerKey)??;
            out.push(PairSeed {
                peer: pk.peer.clone(),
                seed,
            });
        }
        Ok(out)
    }
}

/// Mask one chunk of a training update in place: for every other participant, the ChaCha20
/// keystream of the pair's seed (keyed per round and attempt by HKDF, the chunk index as the
/// nonce, so any chunk's mask is re-derived on its own) is added by the site with the smaller
/// name and subtracted by the other.
pub fn mask_chunk(
    words: &mut [u64],
    me: &SiteId,
    seeds: &[PairSeed],
    participants: &[SiteId],
    salt: &[u8],
    chunk: u32,
) -> Result<(), MaskError> {
    let mut buf = vec![0u8; words.len() * 8];
    for s in seeds
        .iter()
        .filter(|s| participants.contains(&s.peer) && &s.peer != me)
    {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&s.seed);
        let okm = prk
            .expand(&[b"chunk mask"], &aead::CHACHA20_POLY1305)
            .map_err(|_| MaskError::Random)?;
        let key = aead::LessSafeKey::new(aead::UnboundKey::from(okm));
        buf.iter_mut().for_each(|b| *b = 0);
        let mut nonce = [0u8; 12];
        nonce[8..].copy_from_slice(&chunk.to_be_bytes());
        let _tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::empty(),
                &mut buf,
            )
            .map_err(|_| MaskError::Random)?;
        let mask = buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        combine(words, mask, me < &s.peer);
    }
    Ok(())
}

/// What binds a mask to its session, so masks of different sessions are independent.
#[derive(Clone, Debug)]
pub struct MaskContext {
    pub schema: SchemaHash,
    pub round: u32,
    pub session: u32,
}

/// The PRG: HKDF-SHA256 of the shared secret (salted with the session) keys ChaCha20, whose
/// keystream (ChaCha20-Poly1305 sealing zeros; the tag is dropped) gives the words.
fn prg(shared: &[u8], c: &MaskContext, words: usize) -> Result<Vec<u64>, MaskError> {
    let mut salt = b"fedcurate secure sum v1".to_vec();
    salt.extend_from_slice(&c.schema.0);
    salt.extend_from_slice(&c.round.to_be_bytes());
    salt.extend_from_slice(&c.session.to_be_bytes());
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let okm = prk
        .expand(&[b"mask"], &aead::CHACHA20_POLY1305)
        .map_err(|_| MaskError::Random)?;
    let key = aead::LessSafeKey::new(aead::UnboundKey::from(okm));
    let mut buf = vec![0u8; words * 8];
    // The tag authenticates nothing here: only the keystream is used.
    let _tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key([0u8; 12]),
            aead::Aad::empty(),
            &mut buf,
        )
        .map_err(|_| MaskError::Random)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_masks_cancel_in_the_sum() {
        let sites: Vec<SiteId> = ["a", "b", "c", "d"]
            .iter()
            .map(|s| SiteId::new(s).expect("id"))
            .collect();
        let ctx = MaskContext {
            schema: SchemaHash([3; 32]),
            round: 1,
            session: 1,
        };
        let values: Vec<Vec<u64>> = (0..4u64).map(|i| vec![i, 100 + i, u64::MAX - i]).collect();
        let mut keys = Vec::new();
        let mut publics = Vec::new();
        for s in &sites {
            let (k, p) = SessionKeys::generate(s, &sites).expect("keys");
            keys.push(k);
            publics.push(p);
        }
        let mut sum = vec![0u64; 3];
        let mut masked_all = Vec::new();
        for (i, (s, k)) in sites.iter().zip(keys).enumerate() {
            // The keys the others made for site i.
            let peers: Vec<PeerKey> = sites
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, other)| {
                    let key = publics[j]
                        .iter()
                        .find(|p| &p.peer == s)
                        .expect("key for me");
                    PeerKey {
                        peer: other.clone(),
                        public: key.public,
                    }
                })
                .collect();
            let masked = k.mask(s, &peers, &ctx, &values[i]).expect("mask");
            assert_ne!(masked, values[i]);
            protocol::secure::add_into(&mut sum, &masked);
            masked_all.push(masked);
        }
        let plain: Vec<u64> = (0..3)
            .map(|j| values.iter().fold(0u64, |a, v| a.wrapping_add(v[j])))
            .collect();
        assert_eq!(sum, plain);
    }
}

/// Why a peer's key set is not used.
#[derive(Debug, thiserror::Error)]
pub enum PeerKeyError {
    #[error(
        "a secure sum needs at least {SECURE_MIN_PARTICIPANTS} participants including this site; the coordinator offered {0}"
    )]
    TooFew(usize),
    #[error("this site is not among the session's participants")]
    NotAParticipant,
    #[error("no signed key set from participant {0}")]
    Missing(String),
    #[error("{0}'s certificate does not verify against the consortium CA and revocation list: {1}")]
    Certificate(String, String),
    #[error("{0}'s certificate names another site")]
    WrongName(String),
    #[error(
        "{0}'s keys are not signed by its certificate's key (substituted, or signed for other participants)"
    )]
    Signature(String),
    #[error("{0} sent no key for this site")]
    NoKeyForUs(String),
    #[error("no revocation list: configure [federation] crl, or the coordinator must relay one")]
    NoCrl,
    #[error("reading {0}: {1}")]
    Pem(&'static str, String),
}

/// Fewest participants a site masks for (with two, each learns the other's vector).
pub const SECURE_MIN_PARTICIPANTS: usize = 3;

/// This site's certificate and its key, to sign its key sets with.
pub struct Signer {
    certificate: Vec<u8>,
    key: ring::signature::EcdsaKeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// From the site's certificate and key files (PEM; an ECDSA P-256 key in PKCS#8, as the
    /// consortium PKI makes them).
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Self, PeerKeyError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
        let certificate = CertificateDer::pem_slice_iter(cert)
            .next()
            .ok_or_else(|| PeerKeyError::Pem("site certificate", "no certificate".into()))?
            .map_err(|e| PeerKeyError::Pem("site certificate", e.to_string()))?
            .as_ref()
            .to_vec();
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(key)
            .map_err(|e| PeerKeyError::Pem("site key", e.to_string()))?;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| PeerKeyError::Pem("site key", e.to_string()))?;
        Ok(Signer { certificate, key })
    }

    pub fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    /// Sign a key statement.
    pub fn sign(&self, statement: &[u8]) -> Result<Vec<u8>, MaskError> {
        self.key
            .sign(&ring::rand::SystemRandom::new(), statement)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| MaskError::Random)
    }
}

/// Check every other participant's signed key set and return the keys meant for `me`: at least
/// [`SECURE_MIN_PARTICIPANTS`] participants with `me` among them; for each other participant a
/// certificate that chains to the consortium CA, is not revoked (the CRLs given: the site's own
/// and the one the coordinator relays), names that participant, and whose key signed the
/// statement of this session and this participant list.
pub fn verify_peers(
    ca_pem: &[u8],
    crls: &[Vec<u8>],
    me: &SiteId,
    participants: &[SiteId],
    context: &MaskContext,
    signed: &[protocol::secure::SignedKeys],
) -> Result<Vec<PeerKey>, PeerKeyError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
    let mut unique: Vec<&SiteId> = participants.iter().collect();
    unique.sort();
    unique.dedup();
    if unique.len() < SECURE_MIN_PARTICIPANTS {
        return Err(PeerKeyError::TooFew(unique.len()));
    }
    if !unique.contains(&me) {
        return Err(PeerKeyError::NotAParticipant);
    }
    let crls: Vec<CertificateRevocationListDer<'static>> = crls
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| CertificateRevocationListDer::from(c.clone()))
        .collect();
    if crls.is_empty() {
        return Err(PeerKeyError::NoCrl);
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| PeerKeyError::Pem("CA certificate", e.to_string()))?;
        roots
            .add(c)
            .map_err(|e| PeerKeyError::Pem("CA certificate", e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .with_crls(crls)
    .build()
    .map_err(|e| PeerKeyError::Pem("CA certificate", e.to_string()))?;
    let mut out = Vec::new();
    for p in unique.iter().filter(|p| **p != me) {
        let name = p.to_string();
        let set = signed
            .iter()
            .find(|s| &&s.site == p)
            .ok_or_else(|| PeerKeyError::Missing(name.clone()))?;
        let der = CertificateDer::from(set.certificate.clone());
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .map_err(|e| PeerKeyError::Certificate(name.clone(), e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&set.certificate)
            .map_err(|e| PeerKeyError::Certificate(name.clone(), e.to_string()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok());
        if cn != Some(p.as_str()) {
            return Err(PeerKeyError::WrongName(name));
        }
        let statement = protocol::secure::key_statement(
            &context.schema,
            context.round,
            context.session,
            participants,
            p,
            &set.keys,
        );
        let public = cert.public_key().subject_public_key.data.as_ref();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
            .verify(&statement, &set.signature)
            .map_err(|_| PeerKeyError::Signature(name.clone()))?;
        let key = set
            .keys
            .iter()
            .find(|k| &k.peer == me)
            .ok_or_else(|| PeerKeyError::NoKeyForUs(name.clone()))?;
        out.push(PeerKey {
            peer: (*p).clone(),
            public: key.public,
        });
    }
    Ok(out)
}
