// The page of serve.py: pick or capture a photo, call the JSON API with the bearer token, show
// the answer and the aligned crop. Plain browser APIs only; everything comes from this server.
'use strict';

const $ = (id) => document.getElementById(id);
let photo = null; // the Blob sent as `image`

function show(text, cls) {
  const answer = $('answer');
  answer.textContent = text;
  answer.className = cls || '';
}

function setPhoto(blob) {
  photo = blob;
  $('preview').src = URL.createObjectURL(blob);
  $('crop').removeAttribute('src');
}

async function call(method, path, form) {
  const token = $('token').value.trim();
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  let response;
  try {
    response = await fetch(path, { method, headers, body: form });
  } catch (err) {
    return { ok: false, status: 0, body: { detail: 'the server cannot be reached (' + err + ')' } };
  }
  let body;
  try {
    body = await response.json();
  } catch (err) {
    body = { detail: response.statusText };
  }
  return { ok: response.ok, status: response.status, body };
}

function failed(result) {
  if (result.ok) return false;
  const hints = {
    401: ' (check the token)',
    403: ' (this needs an admin token)',
    413: ' (the photo is too large)',
    429: ' (too many attempts: wait, or ask an admin to unlock the subject)',
  };
  show('Error ' + result.status + ': ' + result.body.detail + (hints[result.status] || ''), 'error');
  return true;
}

function needName() {
  const name = $('name').value.trim();
  if (!name) show('Give a subject name first.', 'error');
  return name;
}

function photoForm(extra) {
  if (!photo) {
    show('Pick or capture a photo first.', 'error');
    return null;
  }
  const form = new FormData();
  form.append('image', photo, photo.name || 'camera.png');
  form.append('return_crop', 'true');
  for (const [key, value] of Object.entries(extra || {})) form.append(key, value);
  return form;
}

function showCrop(body) {
  if (body.crop) $('crop').src = body.crop;
}

// The subject's key, when one is typed in (subject-key galleries); never kept by the page.
function keyField() {
  const key = $('subject-key').value.trim();
  return key ? { subject_key: key } : {};
}

async function verify() {
  const name = needName();
  const form = name && photoForm({ name, ...keyField() });
  if (!form) return;
  show('…');
  const result = await call('POST', '/v1/verify', form);
  if (failed(result)) return;
  const b = result.body;
  showCrop(b);
  // Distances come only from a server run with --expose_scores; by default the decision alone.
  const score = 'distance' in b
    ? ', distance ' + b.distance + ' / ' + b.m + ' (threshold ' + b.threshold + ')' : '';
  show((b.match ? 'MATCH' : 'NO MATCH') + ': ' + b.name + score, b.match ? 'match' : 'nomatch');
}

async function identify() {
  const form = photoForm({ top_k: $('top-k').value || '5' });
  if (!form) return;
  show('…');
  const result = await call('POST', '/v1/identify', form);
  const table = $('candidates');
  table.hidden = true;
  if (failed(result)) return;
  const b = result.body;
  showCrop(b);
  // By default only the subjects that match are listed (names, best first); with
  // --expose_scores the closest templates with their distances and decisions.
  const scores = 'threshold' in b;
  const rows = table.querySelector('tbody');
  rows.replaceChildren();
  b.candidates.forEach((c, i) => {
    const tr = document.createElement('tr');
    const cells = scores ? [i + 1, c.name, c.distance, c.match ? 'MATCH' : ''] : [i + 1, c.name];
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = String(text);
      tr.appendChild(td);
    }
    rows.appendChild(tr);
  });
  table.querySelectorAll('th.score').forEach((th) => { th.hidden = !scores; });
  table.hidden = b.candidates.length === 0;
  const best = b.candidates[0];
  const matched = best !== undefined && (!scores || best.match);
  show(matched ? 'Best match: ' + best.name + (scores ? ' (distance ' + best.distance + ')' : '')
               : 'No one matches' + (scores ? ' within the threshold ' + b.threshold + ' among ' +
                                                b.templates + ' templates' : ''),
       matched ? 'match' : 'nomatch');
}

async function enroll() {
  const name = needName();
  const form = name && photoForm(keyField());
  if (!form) return;
  show('…');
  const result = await call('POST', '/v1/subjects/' + encodeURIComponent(name) + '/templates', form);
  if (failed(result)) return;
  showCrop(result.body);
  const issued = result.body.subject_key
    ? '. Subject key, shown only now (give it to the subject): ' + result.body.subject_key : '';
  show('Enrolled ' + result.body.name + ' (' + result.body.templates + ' template(s))' + issued,
       'match');
}

async function revoke() {
  const name = needName();
  if (!name) return;
  show('…');
  const result = await call('DELETE', '/v1/subjects/' + encodeURIComponent(name));
  if (failed(result)) return;
  show('Revoked ' + result.body.name + ': ' + result.body.deleted + ' template(s) deleted', 'match');
}

async function startCamera() {
  const video = $('video');
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    show('No camera: ' + err.message, 'error');
    return;
  }
  video.hidden = false;
  $('camera-shoot').hidden = false;
}

function shoot() {
  const video = $('video');
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext('2d').drawImage(video, 0, 0);
  canvas.toBlob((blob) => {
    blob.name = 'camera.png';
    setPhoto(blob);
  }, 'image/png');
}

async function health() {
  const result = await call('GET', '/healthz');
  $('health').textContent = result.ok
    ? result.body.templates + ' templates, m=' + result.body.m + ', key ' + result.body.key_id +
      (result.body.expose_scores ? ', distances shown (--expose_scores)' : '')
    : 'unavailable';
}

document.addEventListener('DOMContentLoaded', () => {
  $('file').addEventListener('change', (e) => { if (e.target.files[0]) setPhoto(e.target.files[0]); });
  $('camera-start').addEventListener('click', startCamera);
  $('camera-shoot').addEventListener('click', shoot);
  $('verify').addEventListener('click', verify);
  $('identify').addEventListener('click', identify);
  $('enroll').addEventListener('click', enroll);
  $('revoke').addEventListener('click', revoke);
  health();
});
