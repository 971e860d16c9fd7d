// Swagger UI over /openapi.json; no validator badge (it would call validator.swagger.io).
window.SwaggerUIBundle({
  url: '/openapi.json',
  dom_id: '#swagger',
  deepLinking: true,
  validatorUrl: null,
  tryItOutEnabled: false,
});
