// The OpenID provider the end-to-end tests log in against: panva's oidc-provider (pinned in
// package.json), with static accounts, its own login + consent pages that check passwords,
// the device flow, and a small admin API the tests use to change accounts and to tamper with
// the next ID token.
//
// Usage: node tests/idp/provider.js CONFIG.json
//   CONFIG = { "port": 0, "clients": [ client metadata… ], "accounts": { "ID": {
//              "password", "email", "email_verified", "groups": [ … ] } } }
// Prints `ready http://127.0.0.1:PORT` on stdout once it listens. The issuer is that URL.
// A new RSA signing key (with a new key id) is generated at every start.
//
// Test-only admin endpoints (no authentication: loopback, throwaway):
//   POST /admin/accounts/ID   JSON fields to merge into the account (e.g. {"groups": []})
//   POST /admin/tamper        {"mode": "issuer" | "signature"}: the next token response
//                             carries an ID token re-signed with another `iss`, or signed by
//                             a key the provider never published.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node provider.js CONFIG.json');
  process.exit(2);
}
const config = JSON.parse(fs.readFileSync(configPath, 'utf8'));
const accounts = new Map(Object.entries(config.accounts || {}));
let tamper = null;

function newSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };
}
const started = Date.now();
const signingJwk = newSigningKey();
console.error(`signing key generated in ${Date.now() - started} ms`);

const b64url = (buf) => Buffer.from(buf).toString('base64url');

// Signs `payload` as an RS256 JWT with `jwk` (a private RSA JWK).
function signJwt(header, payload, jwk) {
  const key = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
  const sig = crypto.sign('sha256', Buffer.from(input), key);
  return `${input}.${b64url(sig)}`;
}

function tamperIdToken(idToken, mode) {
  const [h, p] = idToken.split('.');
  const header = JSON.parse(Buffer.from(h, 'base64url').toString());
  const payload = JSON.parse(Buffer.from(p, 'base64url').toString());
  if (mode === 'issuer') {
    payload.iss = 'http://127.0.0.1:1/another-issuer';
    return signJwt(header, payload, signingJwk);
  }
  // A key the provider never published, under the published key id.
  return signJwt(header, payload, newSigningKey());
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[c]));
}

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>`
    + `<body><h1>${escapeHtml(title)}</h1>${body}</body></html>`;
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 64 * 1024) throw new Error('body too large');
    chunks.push(c);
  }
  return Buffer.concat(chunks).toString('utf8');
}

const server = http.createServer();
server.listen(Number(config.port || 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    clients: config.clients || [],
    jwks: { keys: [signingJwk] },
    cookies: { keys: [crypto.randomBytes(16).toString('hex')] },
    // The test IdP must put email and groups in the ID token (the controller reads them there).
    conformIdTokenClaims: false,
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
    },
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      deviceFlow: { enabled: true },
    },
    interactions: {
      url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    async findAccount(_ctx, id) {
      const account = accounts.get(id);
      if (!account) return undefined;
      return {
        accountId: id,
        async claims() {
          const a = accounts.get(id) || account;
          return {
            sub: id,
            email: a.email,
            email_verified: a.email_verified,
            groups: a.groups || [],
          };
        },
      };
    },
  });

  provider.use(async (ctx, next) => {
    // Admin API (tests only).
    const admin = ctx.path.match(/^\/admin\/accounts\/([^/]+)$/);
    if (admin && ctx.method === 'POST') {
      const id = decodeURIComponent(admin[1]);
      const changes = JSON.parse(await readBody(ctx.req));
      accounts.set(id, { ...(accounts.get(id) || {}), ...changes });
      ctx.body = { ok: true };
      return;
    }
    if (ctx.path === '/admin/tamper' && ctx.method === 'POST') {
      tamper = JSON.parse(await readBody(ctx.req)).mode;
      ctx.body = { ok: true };
      return;
    }

    const interaction = ctx.path.match(/^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/);
    if (interaction) {
      await handleInteraction(provider, ctx, interaction[1], interaction[2]);
      return;
    }

    await next();

    if (tamper && ctx.path === '/token' && ctx.body && ctx.body.id_token) {
      ctx.body = { ...ctx.body, id_token: tamperIdToken(ctx.body.id_token, tamper) };
      tamper = null;
    }
  });

  server.on('request', provider.callback());
  console.log(`ready ${issuer}`);
});

async function handleInteraction(provider, ctx, uid, action) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== uid) {
    ctx.status = 400;
    ctx.body = page('Error', '<p>interaction mismatch</p>');
    return;
  }
  const { prompt, params } = details;
  ctx.type = 'html';

  if (ctx.method === 'GET' && !action) {
    if (prompt.name === 'login') {
      ctx.body = page('Sign in', `<form method="post" action="/interaction/${uid}/login">`
        + '<input type="text" name="login" placeholder="user"/>'
        + '<input type="password" name="password" placeholder="password"/>'
        + '<button type="submit">Sign in</button></form>');
    } else {
      ctx.body = page('Authorize', `<p>${escapeHtml(params.client_id)} asks for: `
        + `${escapeHtml(params.scope)}</p>`
        + `<form method="post" action="/interaction/${uid}/confirm">`
        + '<button type="submit">Continue</button></form>');
    }
    return;
  }
  if (ctx.method !== 'POST') {
    ctx.status = 405;
    return;
  }
  const form = new URLSearchParams(await readBody(ctx.req));

  if (action === 'login') {
    const id = form.get('login') || '';
    const account = accounts.get(id);
    if (!account || account.password !== form.get('password')) {
      // A wrong password ends the interaction: the relying party hears `access_denied`.
      ctx.respond = false;
      await provider.interactionFinished(ctx.req, ctx.res, {
        error: 'access_denied',
        error_description: 'invalid user name or password',
      }, { mergeWithLastSubmission: false });
      return;
    }
    ctx.respond = false;
    await provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: id } }, {
      mergeWithLastSubmission: false,
    });
    return;
  }

  if (action === 'confirm') {
    const { session: { accountId } } = details;
    let { grantId } = details;
    const grant = grantId
      ? await provider.Grant.find(grantId)
      : new provider.Grant({ accountId, clientId: params.client_id });
    const missing = prompt.details || {};
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    if (missing.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    grantId = await grant.save();
    ctx.respond = false;
    await provider.interactionFinished(ctx.req, ctx.res, { consent: { grantId } }, {
      mergeWithLastSubmission: true,
    });
    return;
  }

  ctx.respond = false;
  await provider.interactionFinished(ctx.req, ctx.res, {
    error: 'access_denied',
    error_description: 'End-User aborted interaction',
  }, { mergeWithLastSubmission: false });
}
