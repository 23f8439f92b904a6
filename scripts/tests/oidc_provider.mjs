// A real OpenID Connect provider on loopback for the single sign-on tests: npm oidc-provider 9
// (installed by scripts/fetch-test-assets.sh into target/test-assets/oidc), with its
// development login pages (any email signs in as itself, no password check).
//
//   node oidc_provider.mjs REDIRECT_URI [CLOCK_OFFSET_SECONDS]
//
// It listens on a free loopback port the kernel picks and prints `ready ISSUER` once it serves.
// Clients: `bitnet` (secret `bitnet-secret`, id_tokens signed RS256 with the provider's keys)
// and `bitnet-hs` (the same, but id_tokens signed HS256 with the client secret: a signature the
// relying party must not accept). PKCE (S256) is required. A clock offset makes the provider
// live in the past, so its id_tokens (valid one minute) are already expired when they arrive.
import { createServer } from 'node:http';
import { pathToFileURL } from 'node:url';

const [redirect, offset = '0'] = process.argv.slice(2);
if (Number(offset)) {
  const real = Date.now;
  Date.now = () => real() + Number(offset) * 1000;
}
const dir = process.env.OIDC_PROVIDER_DIR;
const { default: Provider } = await import(
  pathToFileURL(`${dir}/node_modules/oidc-provider/lib/index.js`).href
);

// The port first (the issuer names it), then the provider on that server.
const server = createServer();
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const issuer = `http://127.0.0.1:${server.address().port}`;
const client = (id, alg) => ({
  client_id: id,
  client_secret: 'bitnet-secret',
  redirect_uris: [redirect],
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  id_token_signed_response_alg: alg,
});
const provider = new Provider(issuer, {
  clients: [client('bitnet', 'RS256'), client('bitnet-hs', 'HS256')],
  pkce: { required: () => true },
  conformIdTokenClaims: false,
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, email: id, email_verified: true, name: id.split('@')[0] }),
  }),
  cookies: { keys: ['bitnet-tests-only'] },
  enabledJWA: { idTokenSigningAlgValues: ['RS256', 'HS256'] },
  // One minute: a provider running ten minutes behind issues id_tokens already expired, while
  // its login cookies (an hour) still work in the browser.
  ttl: { IdToken: 60 },
});
server.on('request', provider.callback());
console.log(`ready ${issuer}`);
