"""WTForms forms of the web app."""
from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField, SubmitField
from wtforms.validators import DataRequired, Email, Length

__all__ = ["ClipForm", "LoginForm"]


class LoginForm(FlaskForm):
    email = StringField("Email", validators=[DataRequired(), Email()])
    password = PasswordField("Password", validators=[DataRequired()])
    submit = SubmitField("Log in")


class ClipForm(FlaskForm):
    title = StringField("Title", validators=[DataRequired(), Length(max=200)])
    submit = SubmitField("Queue")
